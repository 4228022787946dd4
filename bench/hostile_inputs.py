"""What each class of hostile input costs before it is refused: peak memory and wall time.

    python bench/hostile_inputs.py [--keep FOLDER]

Every case runs the real command in a child process; its peak resident memory is the larger of
the kernel's accounting of that child (wait4: it includes this small parent's, about 20 MB, which
Linux hands to a child at fork) and its resident size sampled every 2 ms; its time is the wall
clock's. The acceptance of issue
20: under 1.5 GB and under a minute each. Crafted files go to a temporary folder (several
hundred megabytes at the largest).
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, *chunks: bytes, pixels: bytes | None = None) -> bytes:
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    idat = pixels if pixels is not None else zlib.compress(b"")
    return head + b"".join(chunks) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _record(replayed: list, **extra) -> bytes:
    return json.dumps({"format": 2, "command": "image2image", "replay": replayed, **extra}).encode()


def make_cases(work: Path) -> dict:
    """name -> argv (after the script), each a refused input."""
    from PIL import Image, PngImagePlugin

    def with_record(path: Path, text: str | bytes) -> Path:
        info = PngImagePlugin.PngInfo()
        info.add_text("sd_trajectory", text if isinstance(text, str) else text.decode())
        Image.new("RGB", (64, 64)).save(path, pnginfo=info)
        return path

    fifo = work / "fifo.png"
    os.mkfifo(fifo)
    (work / "bomb.png").write_bytes(_png(100_000, 100_000, _chunk(b"tEXt", b"sd_trajectory\0" + _record(["a"]))))
    with open(work / "chunk.png", "wb") as f:  # a picture at the cap, one chunk Pillow reads whole
        f.write(_png(64, 64, _chunk(b"zzZz", b"\0" * ((256 << 20) - 200))))
    with open(work / "over.png", "wb") as f:
        f.write(_png(64, 64))
        f.truncate(300 << 20)
    Image.new("RGB", (64, 64)).save(work / "xmp.webp", xmp=b"<sdt:record>" * 90_000)
    big = work / "big-input.png"  # 64 megapixels, then junk up to the input cap
    Image.new("RGBA", (8192, 8192), (10, 20, 30, 128)).save(big, compress_level=1)
    with open(big, "r+b") as f:
        f.truncate((1 << 30) - 1)
    deep = "[" * 100_000 + "]" * 100_000
    (work / "deep.json").write_text('{"seeds": ' + deep + "}")
    (work / "deep.toml").write_text("seeds = " + deep + "\n")
    (work / "grid.toml").write_text("prompts = [" + ", ".join(['"a prompt of some words"'] * 150_000) + "]\nname = 5\n")
    image, model = str(ROOT / "images" / "input-128.png"), "shapes"
    return {
        "replay: a named pipe": ["image2image.py", "--replay", fifo],
        "replay: a decompression bomb": ["image2image.py", "--replay", work / "bomb.png"],
        "replay: a 256 MiB chunk": ["image2image.py", "--replay", work / "chunk.png"],
        "replay: a 300 MiB picture": ["image2image.py", "--replay", work / "over.png"],
        "replay: 1 MB of XMP tags": ["image2image.py", "--replay", work / "xmp.webp"],
        "replay: record nested 100,000 deep": ["image2image.py", "--replay",
                                               with_record(work / "deep.png", deep)],
        "replay: record sets --output": ["image2image.py", "--replay", with_record(
            work / "out.png", _record([image, "a", f"--model={model}", "--output=/tmp/x.png"]))],
        "replay: input /dev/zero": ["image2image.py", "--replay", with_record(work / "zero.png", _record(
            ["/dev/zero", "a", f"--model={model}"], input={"path": "/dev/zero", "sha256": "0"}))],
        "replay: hub model not cached": ["image2image.py", "--replay", with_record(
            work / "hub.png", _record([image, "a", "--model=nobody/none@" + "0" * 40]))],
        "input: 1 GiB file, 64 MP picture": ["image2image.py", big, "a", "--model", work / "no-model"],
        "sweep: --grid /dev/zero": ["sweep.py", "txt2image", "x", "--grid", "/dev/zero", "-o", work / "s"],
        "sweep: --prompts /dev/zero": ["sweep.py", "txt2image", "--prompts", "/dev/zero", "-o", work / "s"],
        "sweep: JSON nested 100,000 deep": ["sweep.py", "txt2image", "x", "--grid", work / "deep.json",
                                            "-o", work / "s"],
        "sweep: TOML nested 100,000 deep": ["sweep.py", "txt2image", "x", "--grid", work / "deep.toml",
                                            "-o", work / "s"],
        "sweep: 4 MiB TOML, bad at the end": ["sweep.py", "txt2image", "--grid", work / "grid.toml",
                                              "-o", work / "s"],
        "sweep: --seeds 1e99999999": ["sweep.py", "txt2image", "x", "--seeds", "1e99999999", "-o", work / "s"],
        "sweep: --name {seed:>500000000}": ["sweep.py", "txt2image", "x", "--seeds", "1,2", "--name",
                                            "{seed:>500000000}", "-o", work / "s"],
        "sweep: 100,000-character names": ["sweep.py", "txt2image", "x", "--seeds", "1,2", "--name",
                                           "n" * 100_000 + "{seed}", "-o", work / "s"],
    }


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
    except (OSError, ValueError):
        return 0


def measure(argv: list) -> tuple:
    """(exit status, peak RSS in bytes, seconds, last stderr line) of one command. The peak is
    the larger of the kernel's and one sampled every 2 ms: a run resets the kernel's own
    (run._reset_peaks) once its checks are done."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, str(ROOT / argv[0]), *map(str, argv[1:])],
                                 stdout=subprocess.DEVNULL, stderr=err, cwd=tempfile.gettempdir())
        sampled = 0
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            sampled = max(sampled, _rss(child.pid))
            time.sleep(0.002)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    return child.returncode, max(sampled, usage.ru_maxrss * 1024), seconds, lines[-1] if lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="write the crafted files here and keep them")
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)  # the child that writes them
    args = parser.parse_args()
    if args.make is not None:
        print(json.dumps({name: list(map(str, argv)) for name, argv in make_cases(args.make).items()}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        # Written by a child: Linux starts a child's peak RSS at its parent's, so the parent stays small.
        cases = json.loads(subprocess.run([sys.executable, __file__, "--make", str(work)], check=True,
                                          capture_output=True, text=True).stdout)
        print(f"{'case':40s} {'exit':>4s} {'peak MB':>8s} {'s':>6s}  message")
        worst = (0, 0.0)
        for name, argv in cases.items():
            code, peak, seconds, line = measure(argv)
            worst = (max(worst[0], peak), max(worst[1], seconds))
            print(f"{name:40s} {code:4d} {peak / 1e6:8.0f} {seconds:6.1f}  {line[:90]}")
        print(f"largest: {worst[0] / 1e6:.0f} MB, {worst[1]:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
