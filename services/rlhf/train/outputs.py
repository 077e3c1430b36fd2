"""What a training command writes into ``--out`` (rank 0 only):

    config.json, tokenizer files, weights   the trained model (``save_pretrained``): loads with from_pretrained and
                                            is served as is by the policy or reward service
    manifest.json                           its lineage (`rlhf.core.models.Manifest`): parent, data, config
    metrics.jsonl                           one line per optimizer step (PPO: per PPO step)
    curves.png                              the curves of metrics.jsonl
    eval.json                               the evaluation at the end
    checkpoint/                             the trainer state that ``--resume`` continues from
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from rlhf.core.plot import Panel, Series, render_panels

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
EVAL_FILE = "eval.json"
CHECKPOINT_DIR = "checkpoint"


class MetricsLog:
    """metrics.jsonl: one JSON object a line. On resume, lines after the checkpoint's step are dropped first (they
    belong to the part of the stopped run that the resumed one repeats)."""

    def __init__(self, out: str, enabled: bool, resume_from: int | None) -> None:
        self.path = os.path.join(out, METRICS_FILE)
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        if not enabled:
            return
        os.makedirs(out, exist_ok=True)
        if resume_from is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.rows = [r for r in (json.loads(line) for line in f if line.strip()) if r["step"] <= resume_from]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)

    def write(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
        if "step" in row:
            row["step"] = int(row["step"])
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def curves(self, out: str, panels: Sequence[tuple[str, Sequence[str]]], x_label: str) -> str | None:
        """curves.png: one panel per (title, metric names) with those metrics against the step."""
        if not self.enabled or not self.rows:
            return None
        drawn = []
        for title, names in panels:
            series = [Series(name, [r["step"] for r in self.rows if r.get(name) is not None],
                             [r[name] for r in self.rows if r.get(name) is not None]) for name in names]
            series = [s for s in series if s.y]
            if series:
                drawn.append(Panel(title, series))
        path = os.path.join(out, CURVES_FILE)
        with open(path, "wb") as f:
            f.write(render_panels(drawn, x_label=x_label))
        return path


def write_eval(out: str, results: dict[str, Any]) -> str:
    path = os.path.join(out, EVAL_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    return path


def save_model(out: str, model: Any, tokenizer: Any, manifest: Any, parallel: Any, peft_model: Any = None,
               merge: bool = False) -> None:
    """``save_pretrained`` + manifest into ``out`` on rank 0. Under FSDP every rank takes part in gathering the
    full weights first (the call is collective), then rank 0 writes them. With LoRA (``peft_model``): the adapter
    in ``out/adapter``, and in ``out`` the merged model (``merge``) or the adapter again (`rlhf.train.lora`)."""
    from rlhf.core.models import RewardModel, save_artifact

    if peft_model is not None:
        if parallel.is_main:
            from rlhf.train.lora import ADAPTER_DIR

            adapter_dir = os.path.join(out, ADAPTER_DIR)
            peft_model.save_pretrained(adapter_dir)
            tokenizer.save_pretrained(adapter_dir)
            if merge:
                save_artifact(out, peft_model.merge_and_unload(), tokenizer, manifest)
            else:
                peft_model.save_pretrained(out)
                save_artifact(out, None, tokenizer, manifest)
        return

    hf = model.model if isinstance(model, RewardModel) else model
    state = None
    if parallel.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(hf, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not parallel.is_main:
        return
    if state is None:
        save_artifact(out, model, tokenizer, manifest)
    else:
        hf.save_pretrained(out, state_dict=state)
        save_artifact(out, None, tokenizer, manifest)
