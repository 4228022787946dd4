"""Hashes of what a fixed set of commands writes on tiny models, to prove a refactor changes nothing.

`python tools/behaviour_hashes.py record FILE` runs the commands and writes the hashes to FILE;
`python tools/behaviour_hashes.py check FILE` runs them again and lists every difference.
Pictures are hashed byte for byte. Sidecars and manifests are hashed after dropping what differs
between two identical runs (timings, pids, dates, the temporary folder's name).
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Keys whose values change from one identical run to the next.
VOLATILE = re.compile(r"(second|time|pid|date|started|finished_at|elapsed|host|clock|duration|_s$"
                      r"|available|peak|rss)")

COMMANDS = {
    "plain": ("image2image.py", "{image}", "a red circle", "--model", "{sd2}", "--steps", "4",
              "--seed", "3", "-o", "{out}/plain.png"),
    "snapshots": ("image2image.py", "{image}", "a cat", "--model", "{sd2}", "--steps", "6",
                  "--strength", "0.7", "--seed", "1", "-sd", "2", "--save_last_N", "2",
                  "--snapshot", "both", "--curve", "--keep_best", "-o", "{out}/snaps.png"),
    "noising": ("image2image.py", "{image}", "a dog", "--model", "{sd2}", "--steps", "4",
                "--seed", "2", "--show_noising", "150", "--noising_path", "markov",
                "--preview", "approx", "--animate", "gif", "-o", "{out}/noising.png"),
    "triangle": ("image2image.py", "{image}", "a house", "--model", "{sd2}", "--steps", "5",
                 "--seed", "4", "-gt", "-sd", "2", "--labels", "--triangle_strengths",
                 "0.2,0.6,1.0", "-o", "{out}/tri.png"),
    "triangle_time": ("image2image.py", "{image}", "a house", "--model", "{sd1}", "--steps", "4",
                      "--seed", "5", "-gt", "--triangle_align", "time", "--triangle_low_top",
                      "--sampler", "dpmpp_2m", "--schedule", "karras", "--cfg", "3",
                      "--triangle_strengths", "0.5,1.0", "-o", "{out}/tri_time.png"),
    "triangle_noising": ("image2image.py", "{image}", "a fox", "--model", "{sd2}", "--steps", "10",
                         "--seed", "11", "-gt", "--show_noising", "250", "--animate", "webp",
                         "--snapshot", "both", "--curve", "--output_format", "jpeg", "-o", "{out}/trin.jpg"),
    "triangle_inversion": ("image2image.py", "{image}", "a fox", "--model", "{sd1}", "--steps", "6",
                           "--seed", "12", "-gt", "--triangle_strengths", "0.3,0.7,1.0",
                           "--noising_path", "inversion", "--show_noising", "200", "--inversion_cfg", "2",
                           "--labels", "--animate", "gif", "-o", "{out}/trinv.png"),
    "inversion": ("image2image.py", "{image}", "a boat", "--model", "{sd2}", "--steps", "4",
                  "--seed", "6", "--strength", "0.5", "--noising_path", "inversion", "--inversion_prompt", "a boat",
                  "--inversion_refine", "1", "-sd", "1", "-o", "{out}/inv.png"),
    "ancestral": ("image2image.py", "{image}", "a tree", "--model", "{sd2}", "--steps", "4",
                  "--seed", "7", "--sampler", "euler_a", "--n_images", "2", "--output_format",
                  "webp", "-sp", "0", "-o", "{out}/anc.webp"),
    "sdxl": ("image2image.py", "{image}", "a lamp", "--model", "{sdxl}", "--steps", "2",
             "--seed", "8", "--strength", "1.0", "-sd", "1", "-o", "{out}/xl.png"),
    "txt2image": ("txt2image.py", "a sun", "--model", "{sd2}", "--steps", "3", "--seed", "9",
                  "--n_images", "2", "--n_rows", "2", "--sampler", "heun", "-o", "{out}/t2i.png"),
    "sweep": ("sweep.py", "image2image", "{image}", "a bird", "--model", "{sd2}", "--steps", "3",
              "--strengths", "0.3,0.8", "--seeds", "1,2", "--output", "{out}/sweep", "--sheet-every", "2"),
    "replay": ("image2image.py", "--replay", "{out}/plain.png", "-o", "{out}/replayed.png"),
}


def _normalise(value, folder: str):
    if isinstance(value, dict):
        if str(value.get("file", "")).endswith(".json"):  # a sidecar's own hash holds its timings
            value = {k: v for k, v in value.items() if k not in ("sha256", "bytes")}
        return {k: _normalise(v, folder) for k, v in value.items() if not VOLATILE.search(k)}
    if isinstance(value, list):
        return [_normalise(v, folder) for v in value]
    if isinstance(value, str):
        return value.replace(folder, "<dir>")
    return value


def _digest(path: Path, folder: str) -> str:
    data = path.read_bytes()
    if path.suffix in (".json", ".jsonl"):
        lines = data.decode().splitlines() if path.suffix == ".jsonl" else [data.decode()]
        data = json.dumps([_normalise(json.loads(line), folder) for line in lines if line.strip()],
                          sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def measure() -> dict:
    from PIL import Image

    from stable_diffusion.testing import write_tiny_model

    # A fixed folder: pictures record the model's and the input's paths.
    tmp = Path(tempfile.gettempdir()) / "sd-behaviour-hashes"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # A fixed salt for the private (-sp 0) run's prompt hashes, which the user's own would change.
    salt = tmp / "prompt-salt"
    salt.write_text("5a" * 32 + "\n")
    salt.chmod(0o600)
    os.environ["SD_PROMPT_SALT"] = str(salt)
    if True:
        models = {family: write_tiny_model(tmp / family, family) for family in ("sd1", "sd2", "sdxl")}
        image = tmp / "in.png"
        Image.radial_gradient("L").convert("RGB").resize((96, 80)).save(image)
        out = tmp / "out"
        out.mkdir()
        fields = dict(image=image, out=out, sd1=models["sd1"], sd2=models["sd2"], sdxl=models["sdxl"])
        results = {}
        for name, (script, *args) in COMMANDS.items():
            argv = [sys.executable, str(ROOT / script), *(a.format(**fields) for a in args), "--quiet"]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            results[f"{name}: exit"] = str(done.returncode)
            if done.returncode:
                print(f"{name}: exit {done.returncode}\n{done.stderr[-2000:]}", file=sys.stderr)
        for path in sorted(out.rglob("*")):
            if path.is_file() and path.suffix != ".lock":
                results[str(path.relative_to(out))] = _digest(path, str(tmp))
        return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("record", "check"))
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    results = measure()
    if args.action == "record":
        args.file.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"{len(results)} hashes written to {args.file}")
        return 0
    before = json.loads(args.file.read_text())
    changed = sorted(k for k in before.keys() | results.keys() if before.get(k) != results.get(k))
    for key in changed:
        print(f"{key}: {before.get(key)} -> {results.get(key)}")
    print(f"{len(results)} hashes, {len(changed)} differ")
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
