"""python -m export --model tiny --out DIR: one ONNX graph per component plus export.json."""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from export.attention import MODES
from export.onnx_export import ExportOptions
from export.presets import ALL_PRESETS
from export.quiet import add_verbose_flag, quiet_cli

DEFAULTS = ExportOptions()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its default; a required one says "(required)" instead of "(default: None)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required:
            return f"{action.help} (required)"
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="tiny",
                   help=f"preset ({', '.join(ALL_PRESETS)}) or a local diffusers folder / .safetensors")
    p.add_argument("--out", type=Path, required=True, help="output folder: <component>.onnx (+ .data) and export.json")
    p.add_argument("--precision", choices=("fp32", "fp16"), default=DEFAULTS.precision,
                   help="weights and activations of the exported graphs")
    p.add_argument("--attention", choices=MODES, default=DEFAULTS.attention,
                   help="how attention is emitted in ONNX: decomposed ops, opset-23 Attention, or our plugin")
    p.add_argument("--components", default=None,
                   help="comma-separated components to export; None = every component of the model's family")
    p.add_argument("--height", type=int, default=None, help="example height (pixels); None = the model's default")
    p.add_argument("--width", type=int, default=None, help="example width (pixels); None = the model's default")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs torch check")
    add_verbose_flag(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from export.families import detect_family
    from export.lean import bar_progress
    from export.models import default_size, folder_dims, load_component, resolve_model
    from export.onnx_export import export_component, validate
    from export.specs import Shape, check_size, parse_components, precision_torch_dtype
    from export.store import write_json_atomic

    components = parse_components(args.components) if args.components else None
    dtype = precision_torch_dtype(args.precision)
    folder, model_id = resolve_model(args.model)
    family, dims = detect_family(folder), folder_dims(folder)
    components = components or family.components
    for name in components:
        family.spec(name)  # a name the family lacks: ValueError before any export
    size = default_size(folder)
    shape = Shape(1, args.height or size, args.width or size)
    check_size(dims, shape.height, shape.width)
    opts = ExportOptions(precision=args.precision, attention=args.attention, shape=shape)
    report = {"model": str(args.model), "model_id": model_id, "options": opts.to_json(), "components": {}}
    for name in (bar := tqdm(components, desc="export", unit="component")):
        bar.set_postfix_str(name)
        info = export_component(folder, name, args.out / f"{name}.onnx", opts, progress=bar_progress(f"{name} weights"))
        if not args.no_validate and args.precision == "fp32":  # ORT CPU vs torch CPU; fp16 CPU torch is not a reference
            module = load_component(folder, name, dtype, family=family)
            info["max_abs_err_vs_torch"] = validate(module, family.spec(name), dims, args.out / f"{name}.onnx", shape)
            del module
        report["components"][name] = info
    report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(args.out / "export.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    quiet_cli(argv)
    args = parse_args(argv)
    try:
        report = run(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, info in report["components"].items():
        err = info.get("max_abs_err_vs_torch")
        print(f"{name}: {info['total_seconds']} s, {sum(info['files'].values()) / 1e6:.1f} MB"
              + (f", max |ORT - torch| = {err:.2e}" if err is not None else ""))
    print(f"wrote {args.out / 'export.json'} (peak RSS {report['peak_rss_gib']} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
