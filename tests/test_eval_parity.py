"""Parity with CLIP_benchmark 1.6.2 (its own venv): same random model + same images -> identical results.

Slow (it may create /work/peers/clip-benchmark from PyPI, and starts the peer interpreter):
marked ``slow``; set ``LAION_SKIP_PEER_TESTS=1`` to skip it (e.g. from ``make test``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("LAION_SKIP_PEER_TESTS", "") not in ("", "0"), reason="LAION_SKIP_PEER_TESTS is set"),
]


@pytest.fixture(scope="module")
def parity():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("eval_parity", REPO / "bench" / "eval_parity.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["eval_parity"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    try:
        module.peer_python(create=True)
    except module.PeerUnavailable as exc:
        pytest.skip(f"CLIP_benchmark peer venv unavailable and could not be created offline: {exc}")
    return module


def test_identical_predictions_and_metrics(parity, shared_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    checkpoint = parity.save_tiny_checkpoint(tmp_path / "tiny.pt")
    for case in (parity.skimage_case(tmp_path), parity.imagenet_case(n_templates=2)):
        row = parity.run_case(case, checkpoint, tmp_path, batch_size=50, threads=1)
        assert row["targets_equal"], case.name
        assert row["predictions_equal"], case.name
        assert row["top5_equal"], case.name
        assert parity.metrics_equal(row["ours"], row["peer"]), (case.name, row["ours"], row["peer"])
        assert row["max_abs_logit_diff"] <= 1e-4, case.name
