"""2 real processes (gloo on CPU) train exactly like 1 process with the same global batch."""

from support.ddp import max_abs_diff, run_worker, threads_left


def test_two_processes_with_accumulation_match_one_process_on_the_same_samples(tmp_path):
    # 4 steps: every phase runs (pl and R1 intervals are 2 in the worker).
    single = run_worker(tmp_path / "one.pt", batch=8, batch_gpu=2, steps=4, nproc=1)  # accum 4
    double = run_worker(tmp_path / "two.pt", batch=8, batch_gpu=2, steps=4, nproc=2)  # accum 2
    moved = run_worker(tmp_path / "ref.pt", batch=8, batch_gpu=2, steps=1, nproc=1)
    for net in ("G", "D", "G_ema"):
        assert max_abs_diff(single[net], double[net]) < 1e-5, net
    assert abs(single["pl_mean"] - double["pl_mean"]) < 1e-6
    assert single["pl_mean"] > 0
    # The comparison is meaningful: training moved the weights well beyond the tolerance.
    assert max_abs_diff(single["G"], moved["G"]) > 1e-3
    assert max_abs_diff(single["D"], moved["D"]) > 1e-3


def test_each_rank_ends_its_gloo_threads_before_python_shuts_down(tmp_path):
    # A gloo thread still running during interpreter shutdown now and then aborts a rank
    # that finished its work (SIGABRT): the run then fails after it succeeded. The group's
    # threads end when destroy_process_group releases it, unless something still holds it.
    run_worker(tmp_path / "two.pt", batch=8, batch_gpu=2, steps=1, nproc=2)
    for rank in (0, 1):
        assert not [name for name in threads_left(tmp_path / "two.pt", rank) if "gloo" in name]


def test_two_processes_match_one_process_with_ada_while_p_adapts(tmp_path):
    # p starts at 0.3, so the transforms really run, and moves by 8 x 1 / 160 = 0.05 after
    # every step: augmentation draws and the all-reduced r_t must agree for p to stay equal.
    # 2 steps: the first runs every phase (intervals 2) at p = 0.3, the second runs at the p
    # of the first adjustment. A third step is not compared: by then a few weights whose
    # gradient nearly cancels (Adam divides it by its own small size) differ by 1e-4 between
    # summation orders, also with augment.mode=fixed, so the tolerance would say nothing.
    ada = ("augment.mode=ada", "augment.p=0.3", "augment.interval=1", "augment.speed_kimg=0.16")
    single = run_worker(tmp_path / "one.pt", batch=8, batch_gpu=2, steps=2, nproc=1, extra_sets=ada)
    double = run_worker(tmp_path / "two.pt", batch=8, batch_gpu=2, steps=2, nproc=2, extra_sets=ada)
    # r_t is the mean over the global batch, all-reduced: the same values, not just signs.
    assert single["augment_rt"] == double["augment_rt"]
    assert single["augment_p"] == double["augment_p"]
    first_rt, second_rt = single["augment_rt"]
    assert first_rt > 0.6 > second_rt  # p rose to 0.35 for the second step, then fell back
    for net in ("G", "D", "G_ema"):
        assert max_abs_diff(single[net], double[net]) < 1e-5, net
