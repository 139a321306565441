"""Compare two merged checkpoints tensor by tensor; print one JSON object.

Run as its own process (python bench/compare_outputs.py A B) so the benchmark driver never
imports torch or holds tensors: see measure.py on why the driver must stay small.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensor_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / f for name, f in weight_map.items()}
    out: dict[str, Path] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update(dict.fromkeys(s.keys(), f))
    return out


def _bf16_ulps(diff: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    # Differences in units of the bf16 spacing at the larger operand: rounding shows up as
    # 0.5 to 1, a different computation as much more. Counting representable values between
    # a and b instead would call -1e-9 vs +1e-9 tens of thousands of steps apart.
    mag = torch.maximum(a.float().abs(), b.float().abs())
    exponent = torch.frexp(mag).exponent.clamp_(min=-125)
    spacing = torch.ldexp(torch.ones_like(mag), exponent - 8)
    return float((diff / spacing).max())


def compare(a_dir: Path, b_dir: Path) -> dict[str, object]:
    a_files, b_files = tensor_files(a_dir), tensor_files(b_dir)
    mismatched: list[str] = []
    dtypes: set[str] = set()
    compared = elements = differing = 0
    abs_sum = max_abs = max_ulp = 0.0
    max_abs_name: str | None = None
    for name in (n for n in a_files if n in b_files):
        with safe_open(a_files[name], "pt") as sa, safe_open(b_files[name], "pt") as sb:
            ta, tb = sa.get_tensor(name), sb.get_tensor(name)
        dtypes.update((str(ta.dtype), str(tb.dtype)))
        if ta.shape != tb.shape:
            mismatched.append(f"{name}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
            continue
        if ta.numel() == 0:
            continue
        diff = (ta.float() - tb.float()).abs_()
        compared += 1
        elements += diff.numel()
        differing += int((diff > 0).sum())
        abs_sum += float(diff.double().sum())
        if float(diff.max()) > max_abs:
            max_abs, max_abs_name = float(diff.max()), name
        if ta.dtype == tb.dtype == torch.bfloat16:
            max_ulp = max(max_ulp, _bf16_ulps(diff, ta, tb))
    return {
        "a": str(a_dir),
        "b": str(b_dir),
        "tensors_compared": compared,
        "only_in_a": sorted(set(a_files) - set(b_files)),
        "only_in_b": sorted(set(b_files) - set(a_files)),
        "mismatched": mismatched,
        "dtypes": sorted(dtypes),
        "elements": elements,
        "differing_elements": differing,
        "max_abs_diff": max_abs,
        "max_abs_diff_tensor": max_abs_name,
        "mean_abs_diff": abs_sum / elements if elements else 0.0,
        "max_diff_in_bf16_ulps": max_ulp,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: compare_outputs.py A_DIR B_DIR", file=sys.stderr)
        return 2
    print(json.dumps(compare(Path(argv[0]), Path(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
