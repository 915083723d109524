"""Download benchmark: laion-tasks vs img2dataset 1.47.0 on the same 10,000+ loopback URLs.

One command:  .venv/bin/python bench/download_bench.py [--urls 10000] [--web-urls 4000] [--rounds 2]

- Two inputs: the ../shared/data/images/imagenet_sample200 JPEGs as they are (real photos,
  ~110 KB, ~500 px), and the same photos re-encoded to a web size and format mix (web_mix).
- Server: aiohttp on uvloop in 2 forked processes sharing one listening socket, serving
  the payloads from memory, replicated by URL (/img/<i>.jpg -> payload i % 200). Both clients hit the
  same server in the same run; rounds alternate peer/ours to spread machine noise.
- Same settings for both: 256 px border resize, JPEG quality 95, no opt-out header
  filtering for the peer (--disallowed_header_directives '[]'; ours keeps its opt-out
  checks and robots.txt on, which cost one request here).
- Both run as a fresh CLI process; wall time includes start-up.
- CPU bound: decode + resize + encode of the same payloads in a 2-process pool, no network,
  by the fastest correct path we know (Pillow with shrink-on-load, or OpenCV as img2dataset
  uses it with its reduced decode), written here independently of our pipeline.
- A per-image CPU profile of the pieces of our image path.
- Output quality (PSNR / SSIM against a full-decode LANCZOS reference) of both tools on each
  input's 200 payloads: bench/download_quality.py.
- CPU: the kernel's rusage of each client process and its reaped children (wait4).
Records the run in bench/results/download.json (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LAION_SHARED_DATA", REPO.parent / "shared" / "data"))
IMAGES_DIR = SHARED / "images" / "imagenet_sample200"
PEER_VENV = Path("/work/peers/img2dataset")
PEER_VERSION = "1.47.0"
RESULTS = REPO / "bench" / "results" / "download.json"


def ensure_peer() -> Path:
    exe = PEER_VENV / "bin" / "img2dataset"
    if not exe.exists():
        subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True)  # as ../shared/PEERS.md says
        subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", f"img2dataset=={PEER_VERSION}"], check=True)
    return exe


def web_mix(images: list[bytes]) -> list[bytes]:
    """The 200 sample photos re-encoded to a web-like size and format mix (deterministic).

    Web images skew larger than ImageNet's ~500 px (LAION's high-resolution subset alone is 170M images of at
    least 1024 px). Per 20 images: 1 JPEG upscaled to 2048-2400 px on the long side (5%), 2 PNG and 2 WebP (q80) at
    the original size (10% each), 6 JPEG (q85) upscaled to 1024-1600 px, and the rest the original JPEG bytes.
    About a third are at least 1024 px on the long side.
    """
    import io

    from PIL import Image

    out = []
    for i, data in enumerate(images):
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            buf = io.BytesIO()
            long_side = max(img.size)

            def scaled(target: int) -> Image.Image:
                factor = target / long_side
                return img.resize((round(img.width * factor), round(img.height * factor)), Image.Resampling.LANCZOS)

            if i % 20 == 0:
                scaled(2048 + (i * 37) % 353).save(buf, "JPEG", quality=85)
            elif i % 10 == 1:
                img.save(buf, "PNG")
            elif i % 10 == 2:
                img.save(buf, "WEBP", quality=80)
            elif i % 3 == 0:
                scaled(1024 + (i * 53) % 577).save(buf, "JPEG", quality=85)
            else:
                out.append(data)
                continue
            out.append(buf.getvalue())
    return out


# -- server ---------------------------------------------------------------------------
def _serve(sock: socket.socket, images: list[bytes]) -> None:
    import asyncio

    from aiohttp import web

    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    async def image(request: web.Request) -> web.Response:
        index = int(request.match_info["i"])
        return web.Response(body=images[index % len(images)], content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/img/{i:\\d+}.jpg", image)
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=True)


class ImageServer:
    def __init__(self, images: list[bytes], processes: int = 2) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        ctx = multiprocessing.get_context("fork")
        self.procs = [ctx.Process(target=_serve, args=(self.sock, images), daemon=True) for _ in range(processes)]

    def __enter__(self) -> "ImageServer":
        for proc in self.procs:
            proc.start()
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                import urllib.request

                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/img/0.jpg", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("benchmark image server did not start")

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join(5)
        self.sock.close()


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, cpu seconds) for every process we can read."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    return table


def run_measured(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, float, float, float]:
    """Run ``cmd``; return (result, wall s, CPU s, CPU s sampled).

    CPU is the kernel's user+sys of the process and every descendant it waited for (``wait4`` rusage: the
    download workers and img2dataset's pool are all reaped). As a cross-check, the tree's CPU is also sampled
    from /proc every 0.1 s (it misses up to 0.1 s per process at exit); a descendant that was never reaped would
    show as sampled > rusage, so the larger of the two is the figure.
    """
    import threading

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()), daemon=True)
               for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    cpu_by_pid: dict[int, float] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            table = _proc_table()
            tree, grew = {proc.pid}, True
            while grew:
                new = {pid for pid, (ppid, _) in table.items() if ppid in tree and pid not in tree}
                tree |= new
                grew = bool(new)
            for pid in tree:
                if pid in table:
                    cpu_by_pid[pid] = max(cpu_by_pid.get(pid, 0.0), table[pid][1])
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    for thread in (*readers, sampler):
        thread.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    for thread in (*readers, sampler):
        thread.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = subprocess.CompletedProcess(cmd, proc.returncode, out.get("stdout", ""), out.get("stderr", ""))
    rusage_cpu = usage.ru_utime + usage.ru_stime
    sampled = sum(cpu_by_pid.values())
    return result, wall, max(rusage_cpu, sampled), sampled


# -- runs -----------------------------------------------------------------------------
def run_peer(exe: Path, url_list: Path, out: Path, n: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(exe), "--url_list", str(url_list), "--input_format", "parquet", "--url_col", "url",
        "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
        "--processes_count", "2", "--thread_count", "64", "--image_size", "256", "--resize_mode", "border",
        "--encode_quality", "95", "--number_sample_per_shard", str((n + 1) // 2),
        "--disallowed_header_directives", "[]", "--enable_wandb", "False", "--distributor", "multiprocessing",
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc, wall, cpu, sampled = run_measured(cmd, env)
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset failed: {proc.stderr[-3000:]}")
    success = 0
    for stats in out.glob("*_stats.json"):
        success += json.loads(stats.read_text())["successes"]
    return {"wall_s": wall, "cpu_s": cpu, "cpu_sampled_s": sampled, "success": success}


def run_ours(shard: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "LAION_DOWNLOAD__ALLOW_PRIVATE_NETWORKS": "true",  # the server is on loopback
        "LAION_DOWNLOAD__MAX_CONCURRENCY": "128",
        "LAION_DOWNLOAD__MAX_PER_HOST": "128",  # one host here; the peer has no per-host limit
        "LAION_DOWNLOAD__PROCESSES": "2",
        "LAION_DOWNLOAD__IMAGE_SIZE": "256",
        "LAION_DOWNLOAD__RESIZE_MODE": "border",
        "LAION_DOWNLOAD__ENCODE_QUALITY": "95",
        "LAION_DOWNLOAD__RETRIES": "0",
        "LAION_CONFIG": "",
    }
    cmd = [sys.executable, "-m", "laion_tasks.cli", "download", str(shard), str(out / "000000.tar"),
           str(out / "000000.parquet")]
    proc, wall, cpu, sampled = run_measured(cmd, env, cwd=out)
    if proc.returncode != 0:
        raise RuntimeError(f"laion download failed: {proc.stderr[-3000:]}")
    text = proc.stdout.strip()
    stats = json.loads(text[text.index("{"):]) if text.startswith("{") else json.loads(text.splitlines()[-1])
    return {"wall_s": wall, "cpu_s": cpu, "cpu_sampled_s": sampled, "success": stats["counts"].get("success", 0),
            "counts": stats["counts"]}


# -- the CPU bound: the fastest correct decode + resize + encode we know, no network, not our pipeline --------
SIZE = 256


def _target(width: int, height: int) -> tuple[int, int]:
    scale = SIZE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _shrink_on_load(img: "Image.Image") -> None:  # noqa: F821 - PIL is imported where it runs
    """Our decode settings (read from image_ops): when shrinking a JPEG 1.5x or more, a DCT-scaled decode to at
    least SHRINK_ON_LOAD_MARGIN x the target, with the fast IDCT."""
    from laion_tasks.stages.image_ops import SHRINK_ON_LOAD_MARGIN

    if img.format == "JPEG":
        w, h = _target(*img.size)
        if w * 3 <= img.width * 2 and h * 3 <= img.height * 2:
            wanted = (round(w * SHRINK_ON_LOAD_MARGIN), round(h * SHRINK_ON_LOAD_MARGIN))
            if img.draft("RGB", wanted) is not None:
                img.decoderconfig = (img.decoderconfig[0], 1)


def _bound_pillow(data: bytes) -> int:
    """Pillow at our settings: DCT-scaled JPEG decode (see _shrink_on_load), EXIF rotation, alpha on white,
    our downscale filter, white border, JPEG q95."""
    import io

    from PIL import Image, ImageOps

    from laion_tasks.stages.image_ops import DOWNSCALE_FILTER

    img = Image.open(io.BytesIO(data))
    _shrink_on_load(img)
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    img = img.resize(_target(*img.size), DOWNSCALE_FILTER)
    canvas = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    canvas.paste(img, ((SIZE - img.width) // 2, (SIZE - img.height) // 2))
    out = io.BytesIO()
    canvas.save(out, "JPEG", quality=95)
    return len(out.getvalue())


def _bound_opencv(data: bytes) -> int:
    """OpenCV (what img2dataset uses), plus its reduced-size JPEG decode when that keeps our margin over the
    target (SHRINK_ON_LOAD_MARGIN): imdecode (EXIF applied), INTER_AREA resize, white border, JPEG q95."""
    import cv2
    import numpy as np

    import io

    from PIL import Image

    cv2.setNumThreads(1)
    buf = np.frombuffer(data, np.uint8)
    flag = cv2.IMREAD_COLOR
    with Image.open(io.BytesIO(data)) as header:  # the size from the header only
        width, height, fmt = *header.size, header.format
    if fmt == "JPEG":
        from laion_tasks.stages.image_ops import SHRINK_ON_LOAD_MARGIN

        tw, th = (round(v * SHRINK_ON_LOAD_MARGIN) for v in _target(width, height))
        for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if width // factor >= tw and height // factor >= th:
                flag = reduced
                break
    img = cv2.imdecode(buf, flag)
    h, w = img.shape[:2]
    tw, th = _target(w, h)
    img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
    top, left = (SIZE - th) // 2, (SIZE - tw) // 2
    img = cv2.copyMakeBorder(img, top, SIZE - th - top, left, SIZE - tw - left, cv2.BORDER_CONSTANT,
                             value=(255, 255, 255))
    return len(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1])


def _timed(args: tuple[str, bytes]) -> tuple[int, float]:
    name, data = args
    start = time.process_time()
    size = (_bound_pillow if name == "Pillow" else _bound_opencv)(data)
    return size, time.process_time() - start


def cpu_bound(images: list[bytes], n: int, processes: int = 2) -> dict[str, tuple[float, float]]:
    """(images/s, CPU ms per image) of each candidate path over the same n payloads, in a pool of ``processes``."""
    payloads = [images[i % len(images)] for i in range(n)]
    ctx = multiprocessing.get_context("forkserver")
    rates: dict[str, tuple[float, float]] = {}
    with ctx.Pool(processes) as pool:
        for _ in range(2):  # alternate, best of 2 each: the machine's load moves
            for name in ("Pillow", "OpenCV"):
                pool.map(_timed, [(name, p) for p in payloads[: processes * 8]])  # warm up
                start = time.perf_counter()
                done = cpu = 0.0
                for size, seconds in pool.imap_unordered(_timed, [(name, p) for p in payloads], chunksize=16):
                    done += bool(size)
                    cpu += seconds
                rate, ms = done / (time.perf_counter() - start), 1000 * cpu / max(1, done)
                old = rates.get(name, (0.0, float("inf")))
                rates[name] = (max(old[0], rate), min(old[1], ms))
    return rates


# -- where our CPU goes, per image ----------------------------------------------------------------------
def profile_components(images: list[bytes]) -> dict[str, float]:
    """CPU ms per image of each piece of our image path, one core, in this process."""
    import hashlib
    import io

    from PIL import Image

    from laion_tasks.stages.download import optout
    from laion_tasks.stages.download.shard import SampleTar
    from laion_tasks.stages.image_ops import DOWNSCALE_FILTER, ImageOptions, process_image

    opts = ImageOptions(image_size=SIZE, resize_mode="border", encode_quality=95)

    def per_image(fn, items) -> float:  # type: ignore[no-untyped-def]
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            for item in items:
                fn(item)
            best = min(best, time.process_time() - start)
        return 1000 * best / len(items)

    results = [process_image(d, opts) for d in images]
    decoded = []
    for d in images:
        img = Image.open(io.BytesIO(d))
        _shrink_on_load(img)
        decoded.append(img.convert("RGB"))
    small = [img.resize(_target(*img.size), DOWNSCALE_FILTER) for img in decoded]

    def encode(img: Image.Image) -> None:
        img.save(io.BytesIO(), "JPEG", quality=95)

    def decode(d: bytes) -> None:
        img = Image.open(io.BytesIO(d))
        _shrink_on_load(img)
        img.convert("RGB")

    with tempfile.TemporaryFile() as handle, SampleTar(handle) as sink:
        tar = per_image(lambda r: sink.write("000000001", {"jpg": r.data, "txt": b"image 1", "json": b"{}"}),
                        results)
    return {
        "sha256 of the body (once)": per_image(lambda d: hashlib.sha256(d).digest(), images),
        "embedded opt-out scan (XMP / C2PA)": per_image(lambda d: optout.embedded_opt_out(d, ["PROHIBITED"]), images),
        "decode (shrink-on-load) + to RGB": per_image(decode, images),
        f"resize ({DOWNSCALE_FILTER.name})": per_image(lambda im: im.resize(_target(*im.size), DOWNSCALE_FILTER),
                                                      decoded),
        "encode 256 px JPEG q95": per_image(encode, small),
        "process_image total (checks, EXIF, decode, resize, pad, encode)": per_image(
            lambda d: process_image(d, opts, sha256="0" * 64), images),
        "tar write (3 members)": tar,
    }


INPUTS = {
    "imagenet": "the 200 real ImageNet-sample JPEGs as they are (~110 KB, mostly 500 px)",
    "web": "the same 200 photos re-encoded to a web size mix (see `web_mix`): 5% JPEG at 2048-2400 px, 30% JPEG "
           "at 1024-1600 px, 10% PNG and 10% WebP at ~500 px, 45% the original JPEGs; 168 KB mean; 63 of 200 at "
           "least 1024 px on the long side",
}


def run_input(name: str, images: list[bytes], n: int, rounds: int, exe: Path, work: Path) -> dict:
    out: dict = {"rounds": [], "n": n}
    with ImageServer(images) as server:
        def shard_of(count: int, tag: str) -> tuple[Path, Path]:
            urls = [f"http://127.0.0.1:{server.port}/img/{i}.jpg" for i in range(count)]
            captions = [f"image {i}" for i in range(count)]
            url_list = work / f"urls-{tag}.parquet"
            pq.write_table(pa.table({"url": urls, "caption": captions}), url_list)
            shard = work / f"shard-{tag}" / "000000.parquet"
            shard.parent.mkdir(exist_ok=True)
            pq.write_table(pa.table({"key": [f"000000{i:05d}" for i in range(count)],
                                     "uid": [f"{i:032x}" for i in range(count)], "url": urls, "alt": captions}), shard)
            return url_list, shard

        # Start-up alone (one URL), so the steady CPU per image can be told apart from imports and process start.
        url_list, shard = shard_of(1, "one")
        out["startup"] = {"peer": run_peer(exe, url_list, work / "peer", 1)["cpu_s"],
                          "ours": run_ours(shard, work / "ours")["cpu_s"]}
        url_list, shard = shard_of(n, "all")
        for r in range(rounds):
            load = os.getloadavg()[0]
            peer = run_peer(exe, url_list, work / "peer", n)
            ours = run_ours(shard, work / "ours")
            out["rounds"].append({"peer": peer, "ours": ours, "load_1min_at_start": load})
            print(f"{name} round {r}: img2dataset {peer['success']} ok in {peer['wall_s']:.1f}s "
                  f"({peer['success'] / peer['wall_s']:.0f}/s, {1000 * peer['cpu_s'] / max(1, peer['success']):.2f} "
                  f"ms CPU/img); laion-tasks {ours['success']} ok in {ours['wall_s']:.1f}s "
                  f"({ours['success'] / ours['wall_s']:.0f}/s, {1000 * ours['cpu_s'] / max(1, ours['success']):.2f} "
                  f"ms CPU/img)", flush=True)
    out["bound"] = cpu_bound(images, n)
    print(f"{name}: CPU bound, 2 processes: {out['bound']}", flush=True)
    out["profile"] = profile_components(images)
    # Output quality of the same 200 payloads, both tools at these settings (bench/download_quality.py).
    from download_quality import measure

    out["quality"] = measure(images)
    print(f"{name}: PSNR ours {out['quality']['tools']['laion-tasks']['psnr_mean_db']:.2f} dB, img2dataset "
          f"{out['quality']['tools']['img2dataset']['psnr_mean_db']:.2f} dB", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--urls", type=int, default=10_000, help="URLs of the ImageNet input")
    parser.add_argument("--web-urls", type=int, default=4_000, help="URLs of the web size mix input")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--inputs", default="imagenet,web")
    args = parser.parse_args()
    if not IMAGES_DIR.is_dir():
        sys.exit(f"needs {IMAGES_DIR} (../shared/data)")
    exe = ensure_peer()
    images = [p.read_bytes() for p in sorted(IMAGES_DIR.glob("*.JPEG"))]
    sets = {"imagenet": (images, args.urls), "web": (web_mix(images), args.web_urls)}
    work = Path(tempfile.mkdtemp(prefix="laion-dl-bench-"))
    results = {}
    load_before = os.getloadavg()[0]
    try:
        for name in args.inputs.split(","):
            results[name] = run_input(name, *sets[name], args.rounds, exe, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results(results, args, load_before, os.getloadavg()[0])


def write_results(results: dict, args: argparse.Namespace, load_before: float, load_after: float) -> None:
    """Record the run in bench/results/download.json (bench/README.md); collect_results.py renders RESULTS.md."""
    sys.path.insert(0, str(REPO / "bench"))
    from collect_results import machine_info, save_run

    cores = os.cpu_count() or 2
    inputs = {}
    for name, res in results.items():
        startup = res["startup"]

        def side(m: dict, who: str) -> dict:
            n = max(1, m["success"])
            return {**m, "img_s": m["success"] / m["wall_s"], "cpu_ms_per_img": 1000 * m["cpu_s"] / n,
                    "steady_cpu_ms_per_img": 1000 * (m["cpu_s"] - startup[who]) / n,
                    "cpu_share": m["cpu_s"] / m["wall_s"] / cores}

        rounds = []
        for r in res["rounds"]:
            p, o = side(r["peer"], "peer"), side(r["ours"], "ours")
            rounds.append({"peer": p, "ours": o, "img_s_ratio": o["img_s"] / p["img_s"],
                           "cpu_ratio": p["cpu_ms_per_img"] / o["cpu_ms_per_img"],
                           "load_1min_at_start": r["load_1min_at_start"]})
        bound = {k: {"img_s": v[0], "cpu_ms_per_img": v[1]} for k, v in res["bound"].items()}
        best_ours = max(r["ours"]["img_s"] for r in rounds)
        steady = min(r["ours"]["steady_cpu_ms_per_img"] for r in rounds)
        accounted = sum(res["profile"][k] for k in ("sha256 of the body (once)", "embedded opt-out scan (XMP / C2PA)",
                                                    "process_image total (checks, EXIF, decode, resize, pad, encode)",
                                                    "tar write (3 members)"))
        inputs[name] = {
            "n": res["n"], "description": INPUTS[name], "rounds": rounds, "startup_cpu_s": startup, "bound": bound,
            "bound_share": {"wall": best_ours / max(b["img_s"] for b in bound.values()),
                            "cpu": min(b["cpu_ms_per_img"] for b in bound.values()) / steady},
            "profile_ms": res["profile"], "profile_rest_ms": steady - accounted, "quality": res["quality"],
        }
    setup = (
        f"Rounds alternate img2dataset / ours. Server: loopback, 2-process aiohttp/uvloop, payloads from memory, on "
        f"the same {cores} cores (both clients share the CPU with it; its CPU is counted for neither). Same URLs, "
        "output size and encoding for both: 256 px border, JPEG q95. The decode and filter differ: ours decodes a "
        "JPEG shrunk 1.5x or more with libjpeg's DCT scaling to at least 1.5x the target and the fast IDCT, then "
        "BICUBIC; img2dataset decodes at full size (OpenCV), then INTER_AREA; the output quality of both is measured "
        "below. img2dataset: 2 processes x 64 threads, "
        "`--disallowed_header_directives '[]' --enable_wandb False`. laion-tasks: `laion download` on one shard, 2 "
        "worker processes, robots.txt, TDMRep, X-Robots-Tag and embedded opt-outs checked, SSRF guard on. Wall time of "
        "each CLI process, start-up included. CPU: user+sys of the client process and all its children (the "
        "kernel's `wait4` rusage; every worker is reaped), cross-checked by sampling the process tree in /proc every "
        "0.1 s (the larger is kept). The load average at the start of each round is in the round table. CPU share: CPU seconds / wall seconds / cores. Start-up CPU: the same command on one URL; "
        "steady CPU/img = (CPU - start-up CPU) / successes. CPU bound: decode + resize + encode of the same payloads, "
        "2 processes, no network, measured after the rounds, best of 2 each, at our decode settings (OpenCV with "
        "its reduced decode kept to at least 1.5x the target). Output quality: `bench/download_quality.py` on the "
        "input's 200 distinct payloads (method in the quality table's note)."
    )
    save_run("download", {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": f".venv/bin/python bench/download_bench.py --urls {args.urls} --web-urls {args.web_urls} "
                   f"--rounds {args.rounds} --inputs {args.inputs}",
        "machine": machine_info(load_before, load_after), "setup": setup,
        "settings": {"cores": cores, "rounds": args.rounds}, "inputs": inputs,
    }, title="Download: laion-tasks vs img2dataset 1.47.0")
    print(json.dumps(inputs, indent=1))
    print(f"recorded in {RESULTS}")


if __name__ == "__main__":
    main()
