"""Benchmarks write their Markdown tables into sections of benchmarks/README.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def update_section(name: str, text: str, readme: Path = README) -> None:
    """Replace the text between <!-- name:start --> and <!-- name:end --> (appended if missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = readme.read_text() if readme.exists() else "# Benchmarks\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in body and end in body:
        head, rest = body.split(start, 1)
        body = head + block + rest.split(end, 1)[1]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(readme, body)


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so an interrupted run leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    """What produced a result: python, torch, transformers and moetrim versions (recorded in every JSON)."""
    import platform

    import torch
    import transformers

    import moetrim

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "moetrim": getattr(moetrim, "__version__", "unknown")}


def machine() -> dict:
    """Where a result was measured: cores this process may use (and the machine's), CPU model, GPU if any."""
    import torch

    cpu = None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.lower().startswith("model name")), None)
    except OSError:
        pass
    if not cpu:
        import platform

        cpu = platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cores": cores, "cpu_count": os.cpu_count(), "cpu": cpu, "gpu": gpu, "torch_threads": torch.get_num_threads()}


def load_model(key: str, weights: Path | None = None):
    """(model, tokenizer) of a bundled model in fp32, eval mode; `weights` (a folder, e.g. a training run's
    candidate) in its place where given, so a benchmark can score weights before they are bundled."""
    import torch

    if weights is None:
        import moetrim

        return moetrim.reference_model(key)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(weights)


def bundled_weights() -> dict:
    """A fingerprint (sha256 prefix of model.safetensors) of each bundled model's weights in this checkout,
    so a result measured on weights since replaced can be told from a current one (`fidelity.py` checks)."""
    import hashlib

    from moetrim.assets import BUNDLED

    out = {}
    for key, folder in BUNDLED.items():
        f = Path(folder) / "model.safetensors"
        if f.is_file():
            out[key] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return out


def stack(experts_implementation=None) -> dict:
    """The stack a result was measured on: versions, the stock experts implementation it was compared
    against (None where no stock experts are compared), the machine and the bundled weights.
    `write_json` records it."""
    return {**versions(), "experts_implementation": experts_implementation, "machine": machine(),
            "bundled_weights": bundled_weights()}


def write_json(path: Path, obj, *, experts_implementation=None) -> None:
    """Write a result as JSON; a dict gets `stack` (versions, stock experts implementation, machine)
    unless it has one already, so every benchmark records what produced it from this one place."""
    if isinstance(obj, dict) and "stack" not in obj:
        obj = {**obj, "stack": stack(experts_implementation)}
    write_text_atomic(path, json.dumps(obj, indent=1))


# Two-sided 95% t quantiles by degrees of freedom (n - 1); beyond the table the normal 1.96.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return mean, _T95.get(n - 1, 1.96) * sd / n**0.5


def paired_difference(a: list[float], b: list[float]) -> str:
    """'a > b', 'a < b' or 'tie': the paired difference over seeds by its 95% t-interval (identical
    differences in every seed count as a difference, equal values as a tie)."""
    mean, half = interval([x - y for x, y in zip(a, b)])
    if abs(mean) < 1e-12 or abs(mean) <= half:
        return "tie"
    return "a > b" if mean > 0 else "a < b"


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as PNG through a temporary file and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    return path


def bundled_model(name: str) -> tuple[str, list[str], str]:
    """``(bundled key, trained domains, fine-tuning domain)`` of a bundled model: ``reference`` or
    ``longtail`` (also ``reference-longtail``). The domains and the fine-tuning domain are those its
    ``training.json`` records; the first model's fine-tuning domain is ``units``."""
    from moetrim.assets import BUNDLED, bundled_name, finetune_domain, trained_domains
    from moetrim.data.tasks import DOMAINS

    key = name if name in BUNDLED else bundled_name(name)
    if key is None:
        raise SystemExit(f"--model: {name!r} is not a bundled model; choose one of {', '.join(BUNDLED)}")
    folder = BUNDLED[key]
    return key, trained_domains(folder) or list(DOMAINS), finetune_domain(folder) or "units"


def for_model(path: Path, key: str) -> Path:
    """A results file of another model than the first sits beside the first's: quality.json -> quality-longtail.json."""
    return path if key == "reference" else path.with_name(f"{path.stem}-{key}{path.suffix}")


def section(name: str, key: str) -> str:
    """The README section of a benchmark's table for a model (the first model's keeps its old name)."""
    return name if key == "reference" else f"{name}-{key}"


def sweep_arguments(ap) -> None:
    """The options of a seeds-by-ratios sweep on a bundled model (auto.py, width_buckets.py)."""
    ap.add_argument("--model", default="reference", help="bundled model: reference or longtail")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ratios", default="0.5,0.75", help="fractions of routed-expert parameters removed")
    ap.add_argument("--items", type=int, default=128, help="eval items per domain")
    ap.add_argument("--calib", type=int, default=64, help="calibration items per domain")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=None)


def sweep_values(ap, args) -> tuple[list[int], list[float]]:
    """(seeds, ratios) of `sweep_arguments`, or the parser's usage error (exit 2) when they do not parse."""
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        ap.error("--seeds takes whole numbers and --ratios fractions, comma-separated")
    if not seeds or not ratios or not all(0 < r < 1 for r in ratios):
        ap.error("give at least one seed and ratios strictly between 0 and 1")
    return seeds, ratios


def sweep_setup(ap, argv, default_out: Path):
    """Parse a sweep's options: (args, seeds, ratios, bundled key, its domains, results path); sets torch's threads."""
    import torch

    sweep_arguments(ap)
    args = ap.parse_args(argv)
    seeds, ratios = sweep_values(ap, args)
    key, domains, _ = bundled_model(args.model)
    torch.set_num_threads(args.threads)
    return args, seeds, ratios, key, domains, args.out or for_model(default_out, key)


def publish(result: dict, out: Path, default_out: Path, name: str, key: str, plot, markdown) -> None:
    """Write a sweep's JSON, its PNG (`plot(result, path)`) and its table (`markdown(result, png)`), printed and,
    when written to the default path, put in benchmarks/README.md's section for the model."""
    write_json(out, result)
    png = plot(result, out.with_suffix(".png"))
    table = markdown(result, png)
    print(table)
    if out.resolve() == for_model(default_out, key).resolve():
        update_section(section(name, key), table)
