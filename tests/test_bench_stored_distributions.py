"""bench/stored_distributions.py's seeds: run names and the summary of means, spreads and differences from online."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_stored_distributions",
                                                  os.path.join(ROOT, "bench", "stored_distributions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_runs_are_named_apart_and_summarised_against_online():
    bench = _bench()
    assert bench.run_name("online", 0) == "online" and bench.run_name("stored-k32", 2) == "stored-k32_seed2"
    records = [  # the first runs' records have no seed (seed 0)
        {"variant": "online", "validation_bleu_greedy": 29.0, "test_bleu_greedy": 30.0},
        {"variant": "online", "seed": 1, "validation_bleu_greedy": 27.0, "test_bleu_greedy": 29.0},
        {"variant": "stored-k32", "validation_bleu_greedy": 28.0, "test_bleu_greedy": 29.5},
        {"variant": "stored-k32", "seed": 1, "validation_bleu_greedy": 27.5, "test_bleu_greedy": 28.0},
        {"variant": "stored-k8", "validation_bleu_greedy": 29.5, "test_bleu_greedy": 31.0},  # seed 0 only
    ]
    lines = bench.seed_summary(records)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    # online: validation mean 28.0, test mean 29.5, spread 1.0; stored: 27.75 (-0.25), 28.75 (-0.75), spread 1.5
    assert rows["online"] == ["online", "0, 1", "28.00", "", "29.50", "1.00", ""]
    assert rows["stored-k32"] == ["stored-k32", "0, 1", "27.75", "-0.25", "28.75", "1.50", "-0.75"]
    # a variant with fewer seeds is compared with online on its own seeds: 29.5 - 29.0, 31.0 - 30.0
    assert rows["stored-k8"] == ["stored-k8", "0", "29.50", "+0.50", "31.00", "0.00", "+1.00"]
