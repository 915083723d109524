"""SSRF guard tests.

The end-to-end test runs inside ``unshare -n -m``: a fresh network namespace that has
only a loopback interface (so nothing can leave the machine even if the guard failed)
and a private mount namespace whose /etc/hosts maps test names to chosen addresses.
A "public" address (93.184.216.34) and the cloud metadata address (169.254.169.254)
are added to that loopback, and one server listens on all of them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from laion_tasks.config import DownloadConfig
from laion_tasks.net import ssrf
from laion_tasks.stages.download import download_shard
from tests.download_fixtures import FixtureServer, make_jpeg, redirect, write_shard

PUBLIC_IP = "93.184.216.34"
METADATA_IP = "169.254.169.254"
IN_NETNS = os.environ.get("LAION_TEST_IN_NETNS") == "1"
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://0x7f.1/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://0/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]/",
        "http://[0:0:0:0:0:ffff:a9fe:a9fe]/",
        "http://[2002:a9fe:a9fe::]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://0xa9fea9fe/",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
        "http://172.16.0.1/",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        "http://240.0.0.1/",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://localhost/",
        "http://LOCALHOST./",
        "http://a.localhost/",
    ],
)
def test_check_url_refuses_internal_addresses(url: str) -> None:
    with pytest.raises(ssrf.SSRFBlocked):
        ssrf.check_url(url)
    ssrf.check_url(url, allow_private=True)  # the explicit switch for tests and the demo


def test_check_url_allows_public_and_rejects_bad_urls() -> None:
    ssrf.check_url("http://93.184.216.34/a.jpg")
    ssrf.check_url("https://example.com/a.jpg")
    ssrf.check_url("https://deadbeef.cafe/a.jpg")
    for bad in ("ftp://example.com/a", "file:///etc/passwd", "http:///x", "http://example.com:99999/"):
        with pytest.raises(ValueError):
            ssrf.check_url(bad)


def test_resolver_refuses_any_private_answer() -> None:
    """DNS answers are checked where the connection is made: a host with one private
    address among public ones (a rebinding trick) is refused as a whole."""

    class StubResolver:
        def __init__(self, answers: list[str]) -> None:
            self.answers = answers

        async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict]:
            return [{"hostname": host, "host": a, "port": port, "family": 2, "proto": 6, "flags": 0} for a in self.answers]

        async def close(self) -> None:
            pass

    async def resolve(answers: list[str], allow: bool = False) -> list[dict]:
        return await ssrf.GuardedResolver(allow, StubResolver(answers)).resolve("x.test", 80)

    assert [r["host"] for r in asyncio.run(resolve([PUBLIC_IP]))] == [PUBLIC_IP]
    for answers in ([PUBLIC_IP, "127.0.0.1"], [METADATA_IP], ["::ffff:10.0.0.1"], ["fd00::1"]):
        with pytest.raises(ssrf.SSRFBlocked):
            asyncio.run(resolve(answers))
    assert len(asyncio.run(resolve([PUBLIC_IP, "127.0.0.1"], allow=True))) == 2


def _netns_available() -> str | None:
    if not (shutil.which("unshare") and shutil.which("ip") and shutil.which("mount")):
        return "unshare/ip/mount not installed"
    probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create namespaces: {probe.stderr.decode(errors='replace').strip()}"
    return None


@pytest.mark.timeout(240)
def test_ssrf_guard_end_to_end_in_isolated_network_namespace(tmp_path: Path) -> None:
    reason = _netns_available()
    if reason:
        pytest.skip(f"needs root and util-linux/iproute2 for a loopback-only namespace: {reason}")
    hosts = tmp_path / "hosts"
    hosts.write_text(
        f"127.0.0.1 localhost\n{PUBLIC_IP} public.test\n127.0.0.1 internal.test\n"
        f"{METADATA_IP} metadata.test\n{PUBLIC_IP} rebind.test\n127.0.0.1 rebind.test\n"
    )
    script = (
        "set -e; ip link set lo up; "
        f"ip addr add {PUBLIC_IP}/32 dev lo; ip addr add {METADATA_IP}/32 dev lo; "
        f"mount --bind {hosts} /etc/hosts; "
        f"exec {sys.executable} -m pytest -q -p no:cacheprovider {Path(__file__)} -k netns_inner"
    )
    env = {**os.environ, "LAION_TEST_IN_NETNS": "1"}
    result = subprocess.run(
        ["unshare", "-n", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=220, cwd=REPO, env=env
    )
    output = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    assert "1 passed" in result.stdout, output


@pytest.mark.skipif(not IN_NETNS, reason="runs only inside the namespace made by the end-to-end test above")
def test_netns_inner(tmp_path: Path) -> None:
    import socket

    assert [name for _, name in socket.if_nameindex()] == ["lo"], "not in a loopback-only network namespace"
    jpeg = make_jpeg()
    with FixtureServer(host="0.0.0.0") as srv:
        port = srv.port
        srv.static("/public.jpg", jpeg)
        srv.static("/secret", b"internal service")
        srv.static("/latest/meta-data/", b"cloud credentials")
        targets = {
            "/to-loopback": f"http://127.0.0.1:{port}/secret",
            "/to-metadata": f"http://{METADATA_IP}:{port}/latest/meta-data/",
            "/to-metadata-decimal": f"http://2852039166:{port}/latest/meta-data/",
            "/to-loopback-octal": f"http://0177.0.0.1:{port}/secret",
            "/to-mapped-v6": f"http://[::ffff:127.0.0.1]:{port}/secret",
            "/to-internal-name": f"http://internal.test:{port}/secret",
            "/to-metadata-name": f"http://metadata.test:{port}/latest/meta-data/",
            "/to-rebind-name": f"http://rebind.test:{port}/secret",
        }
        for path, target in targets.items():
            srv.routes[path] = redirect(target)
        pub = lambda path: f"http://{PUBLIC_IP}:{port}{path}"  # noqa: E731
        cases = {pub("/public.jpg"): "success", f"http://public.test:{port}/public.jpg": "success"}
        cases.update({pub(path): "blocked_ssrf" for path in targets})
        cases.update(
            {
                f"http://127.0.0.1:{port}/secret": "blocked_ssrf",
                f"http://2130706433:{port}/secret": "blocked_ssrf",
                f"http://0x7f.1:{port}/secret": "blocked_ssrf",
                f"http://[::1]:{port}/secret": "blocked_ssrf",
                f"http://localhost:{port}/secret": "blocked_ssrf",
                f"http://internal.test:{port}/secret": "blocked_ssrf",
                f"http://rebind.test:{port}/secret": "blocked_ssrf",
                f"http://{METADATA_IP}:{port}/latest/meta-data/": "blocked_ssrf",
                f"http://0xa9fea9fe:{port}/latest/meta-data/": "blocked_ssrf",
            }
        )
        urls = list(cases)
        shard = write_shard(tmp_path / "000000.parquet", urls)
        config = DownloadConfig(allow_private_networks=False, request_deadline_s=5, retries=0, processes=1)
        stats = download_shard(shard, str(tmp_path / "o.tar"), str(tmp_path / "o.parquet"), config)
        assert srv.seen("/secret") == 0, "the guard let a request reach loopback"
        assert srv.seen("/latest/meta-data/") == 0, "the guard let a request reach the metadata address"
        for path in targets:
            assert srv.seen(path) == 1
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    got = {r["url"]: (r["status"], r["error_message"]) for r in rows}
    wrong = {u: got[u] for u in urls if got[u][0] != cases[u]}
    assert not wrong, wrong
    assert stats.counts == {"success": 2, "fail:blocked_ssrf": len(urls) - 2}
