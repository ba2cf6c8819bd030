"""What the benchmarks (scripts/bench_*.py) and the GPU check share: ratios to a baseline measured in the same run
(a ratio across runs would mix in the machine's load), and the benchmark record's set-up and writing."""

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch


def add_ratios(rows: dict[str, dict], baseline: str, key: str, ratio_key: str) -> dict[str, dict]:
    """``rows[name][ratio_key] = rows[name][key] / rows[baseline][key]`` where both are measured (non-zero)."""
    base = rows.get(baseline, {}).get(key)
    for row in rows.values():
        if base and row.get(key):
            row[ratio_key] = row[key] / base
    return rows


def start_benchmark(name: str, cfg: Any) -> Path:
    """Threads and seed set, the resolved config written to OUTPUT_DIR/bench_NAME_config.yaml; returns OUTPUT_DIR."""
    from entmax_vit.data.config_io import save_config

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    save_config(cfg, out_dir / f"bench_{name}_config.yaml")
    torch.manual_seed(cfg.seed)
    return out_dir


def write_benchmark(name: str, cfg: Any, results: dict, note: str, table: Callable[[dict], str]) -> dict:
    """The record (torch version, threads, config, ``results``, ``note``) written to OUTPUT_DIR/bench_NAME.json and
    printed: as JSON with ``cfg.json``, else as ``table(record)``."""
    from entmax_vit.data.config_io import to_dict

    record = {"benchmark": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "config": to_dict(cfg), **results, "note": note}
    path = Path(cfg.output_dir) / f"bench_{name}.json"
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2) if cfg.json else table(record))
    logging.getLogger(f"bench_{name}").info("wrote %s", path)
    return record
