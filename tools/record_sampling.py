"""Record new sampling defaults in an exported generator (.safetensors), in place, keeping the ones it recorded
before as its ``sample_paper`` record: what ``--sampler paper`` (``sampler="paper"``) starts from, so today's
sampler stays one flag away. The weights are unchanged. How the shipped MAR and D2C generators got the defaults
the `repro frontier` chose (docs/speed.md):

    python tools/record_sampling.py tokenbridge/weights/fmnist_mar_generator.safetensors num_iter=8 \\
        diffusion_sampler=ddim num_sampling_steps=25 num_sampling_steps_end=5
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from tokenbridge.checkpoint import _read_export, save_generator_weights
from tokenbridge.generators import check_sample_options, get_family


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="an exported generator .safetensors (rewritten in place, atomically)")
    p.add_argument("options", nargs="+", metavar="KEY=VALUE", help="sampling options to record over the current")
    args = p.parse_args(argv)
    if not all("=" in item for item in args.options):
        p.error("each option must be KEY=VALUE")
    record, state = _read_export(Path(args.file))
    given = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.options)}
    given = check_sample_options(get_family(record["family"]), given, prefix="recorded option")
    record.setdefault("sample_paper", record.get("sample") or {})
    record["sample"] = {**record["sample_paper"], **given}
    save_generator_weights(state, record, args.file, overwrite=True)
    print(f"{args.file}: sample {record['sample']}; sample_paper {record['sample_paper']}")


if __name__ == "__main__":
    main()
