"""The benchmarks' timer (`flashdispatch.timing`), on the CPU: what it runs and in which order."""

import time

from flashdispatch.timing import median_time, median_times


def test_median_times_runs_the_candidates_in_turns_and_times_each():
    calls = []

    def sleeper(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run

    fast, slow = median_times([sleeper("fast", 0.001), sleeper("slow", 0.02)], "cpu", warmup=1, repeats=5)
    # warm-up: each once, then 5 rounds of both in turn
    assert calls == ["fast", "slow"] + ["fast", "slow"] * 5
    assert 0.001 <= fast < 0.02 <= slow


def test_median_time_is_the_one_candidate_case():
    calls = []
    seconds = median_time(lambda: calls.append(time.sleep(0.002)), "cpu", warmup=2, repeats=3)
    assert len(calls) == 5 and seconds >= 0.002
