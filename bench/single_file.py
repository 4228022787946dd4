"""Loading a single-file LDM checkpoint against loading the same model as a diffusers folder.

The full-size SD 2.1-base model of bench/networks.py (random float32 weights) is written as a
diffusers folder, then converted to one LDM `.safetensors` file (`testing.ldm_state_dict`, with
no architecture metadata: the real widths must be inferred by the family's rules, and the
inferred configs are checked against the folder's). Each load runs in its own subprocess:
`StableDiffusion.from_pretrained(path)` until every weight is evaluated in memory; it reports
wall seconds and the process's peak resident memory (VmHWM). Folder and file alternate, `--reps`
times each. Not part of the test run.

    python bench/single_file.py --reps 2 --json single_file.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def worker(path: str) -> dict:
    import mlx.core as mx

    from networks import _maxrss_mb
    from stable_diffusion.pipeline import StableDiffusion

    start = time.perf_counter()
    sd = StableDiffusion.from_pretrained(path)
    mx.eval(sd.unet.parameters(), sd.vae.parameters(), [e.parameters() for e in sd.text_encoders])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": _maxrss_mb()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0

    from safetensors.numpy import save_file

    from networks import write_model
    from stable_diffusion.config import read_pipeline_config
    from stable_diffusion.model_io import resolve_model
    from stable_diffusion.single_file import _write_tokenizer
    from stable_diffusion.testing import ldm_state_dict

    work = Path(tempfile.mkdtemp(prefix="bench-single-file-"))
    env = dict(os.environ, SD_SINGLE_FILE_CACHE=str(work / "views"))
    try:
        folder, file = work / "folder", work / "model.safetensors"
        written = write_model(folder)
        # The folder gets CLIP's real tokenizer too (networks.py writes the tiny one), as the file does.
        shutil.rmtree(folder / "tokenizer")
        _write_tokenizer(folder / "tokenizer", 49408, "!", folder)
        tensors = ldm_state_dict(folder, "sd2")
        save_file(tensors, str(file))
        del tensors
        print(f"model: {written / 2**30:.2f} GiB of float32 weights; folder and "
              f"{file.stat().st_size / 2**30:.2f} GiB single file (one unused OpenCLIP block more)")

        os.environ["SD_SINGLE_FILE_CACHE"] = env["SD_SINGLE_FILE_CACHE"]
        start = time.perf_counter()
        view = resolve_model(str(file))[0]  # once per file: later loads find it in the cache
        print(f"first look at the file (header, inferred configs, tokenizer files): "
              f"{time.perf_counter() - start:.2f} s")
        inferred = read_pipeline_config(view)
        reference = read_pipeline_config(folder)
        same = {name: getattr(inferred, name) == getattr(reference, name) for name in ("vae", "text_encoders")}
        unet_fields = ("block_out_channels", "down_block_types", "up_block_types", "heads",
                       "transformer_layers", "cross_attention_dim", "use_linear_projection", "norm_num_groups")
        same["unet"] = all(getattr(inferred.unet, f) == getattr(reference.unet, f) for f in unet_fields)
        print(f"configs inferred from the file's shapes equal the folder's: {same}")

        results = {"folder": [], "file": []}
        for _ in range(args.reps):
            for kind, path in (("folder", folder), ("file", file)):
                out = subprocess.run([sys.executable, __file__, "--worker", str(path)], env=env,
                                     capture_output=True, text=True, check=True)
                results[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
        summary = {}
        for kind, runs in results.items():
            summary[kind] = {"seconds_median": statistics.median(r["seconds"] for r in runs),
                             "seconds_min": min(r["seconds"] for r in runs),
                             "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs), "runs": runs}
            print(f"{kind:7s} load {summary[kind]['seconds_median']:6.2f} s (median of {len(runs)}, "
                  f"min {summary[kind]['seconds_min']:.2f}), peak RSS {summary[kind]['peak_rss_mb_max']:.0f} MB")
        ratio = summary["file"]["seconds_median"] / summary["folder"]["seconds_median"]
        memory = summary["file"]["peak_rss_mb_max"] / summary["folder"]["peak_rss_mb_max"]
        print(f"file / folder: load time x{ratio:.2f}, peak memory x{memory:.2f}")
        if args.json:
            args.json.write_text(json.dumps({"configs_equal": same, "results": summary,
                                             "time_ratio": ratio, "memory_ratio": memory}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
