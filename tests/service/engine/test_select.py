"""Plan choice by measurement: eligibility, the check against the float32 reference, the timing,
and what the service and ``csist plans`` report; on a real tiny DeRefNet export and the bundled
int8 model."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from service.engine import host
from service.engine.plans import ExecutionPlan, PlanOptions, build_plan, why_not
from service.engine.select import probe_windows, relative_error, select_plan, table
from service.kernels import conv, deform
from service.modelpkg.manifest import load_package
from service.modelpkg.model import ModelError, load_model
from service.runtime.config import DEFAULT_MODEL_PATH
from tests.service.tiny_derefnet import tiny_model_path

pytest.importorskip("torch", reason="exporting the tiny model needs torch (not in the service image)")

INT8_MODEL = DEFAULT_MODEL_PATH.with_name("derefnet-int8")
OPTIONS = PlanOptions(threads=1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_model_path(tmp_path_factory)


def test_auto_checks_and_times_every_eligible_plan_and_serves_the_fastest(tiny_model):
    sel = select_plan(tiny_model, options=OPTIONS, budget_s=0.5)
    rows = {r["plan"]: r for r in sel.report()["candidates"]}
    assert set(rows) == {"onnxruntime", "native-deform", "amx", "cuda"}  # single only without parts
    assert rows["onnxruntime"]["max_rel_error"] == 0.0  # it is the reference
    timed = {n: r["ms_per_window"] for n, r in rows.items() if r["status"] in ("chosen", "passed")}
    assert "onnxruntime" in timed and all(ms > 0 for ms in timed.values())
    assert rows[sel.plan.name]["status"] == "chosen" and timed[sel.plan.name] == min(timed.values())
    assert (rows["native-deform"]["status"] in ("chosen", "passed")) == deform.AVAILABLE
    assert rows["amx"]["status"] == "not eligible"  # the tiny model has no amx_split
    assert "amx_split" in rows["amx"]["reason"]
    assert "| onnxruntime |" in table(sel.report())


def test_a_plan_that_differs_from_the_reference_is_not_served(tiny_model, monkeypatch):
    """A kernel that computes wrong maps on this host (as int8 without VNNI does) fails the check
    and is skipped; when every plan fails, the service refuses to start and names each reason."""
    real = ExecutionPlan.run

    def skewed(self, windows):
        out = real(self, windows)
        return out * 1.5 if self.name == "native-deform" else out

    monkeypatch.setattr(ExecutionPlan, "run", skewed)
    if deform.AVAILABLE:
        sel = select_plan(tiny_model, options=OPTIONS, budget_s=0.2)
        rows = {r["plan"]: r for r in sel.report()["candidates"]}
        assert rows["native-deform"]["status"] == "failed check"
        assert rows["native-deform"]["max_rel_error"] == pytest.approx(0.5, rel=1e-3)
        assert sel.plan.name == "onnxruntime"
        with pytest.raises(ModelError, match="native-deform.*differ from the reference"):
            select_plan(tiny_model, options=OPTIONS, requested="native-deform")
    monkeypatch.setattr(ExecutionPlan, "run", lambda self, w: np.full(real(self, w).shape, np.nan, np.float32))
    monkeypatch.setattr("service.engine.select._reference", lambda *a: (np.ones((8, 33, 33), np.float32), "ones", 0.0))
    with pytest.raises(ModelError, match="no execution plan gives correct maps.*onnxruntime: maps differ"):
        select_plan(tiny_model, options=OPTIONS, budget_s=0.1)


def test_forced_plans_load_only_their_files(tiny_model):
    stock = build_plan("onnxruntime", tiny_model, options=OPTIONS)
    assert stock.model.session is None and stock.streaming and stock.pairs
    assert set(stock.backends().values()) == {"onnxruntime:CPUExecutionProvider"}
    assert all(".seg" not in f for f in stock.files()) and "model.onnx" not in stock.files()
    assert sorted(stock.files()) == ["align.onnx", "encoder.onnx", "fuse.onnx", "head.onnx"]
    single = build_plan("onnxruntime-single", tiny_model, options=OPTIONS)
    assert single.files() == ["model.onnx"] and not single.streaming and single.encode is None
    windows = probe_windows(4)
    assert relative_error(single.run(windows), stock.run(windows)) < 1e-5  # parts = single graph
    if deform.AVAILABLE:
        native = build_plan("native-deform", tiny_model, options=OPTIONS)
        assert native.backends()["head"] == "native-deform" and not native.pairs
        assert not any("align" in f or "fuse" in f for f in native.files())  # the halves would not run
        assert any(".seg" in f for f in native.files())
    if not conv.AMX:
        with pytest.raises(ModelError, match="plan='amx' cannot be used here"):
            select_plan(tiny_model, options=OPTIONS, requested="amx")
    with pytest.raises(ModelError, match="plan='fast' is not one of"):
        select_plan(tiny_model, options=OPTIONS, requested="fast")


def test_eligibility_is_said_without_loading(tiny_model):
    card = load_model(tiny_model, parts=False).card
    assert why_not("onnxruntime", card, OPTIONS) is None
    if "CUDAExecutionProvider" in host.host_summary()["providers"]:
        assert why_not("cuda", card, OPTIONS) is None
    else:
        assert "no CUDAExecutionProvider" in why_not("cuda", card, OPTIONS)
    gpu_first = PlanOptions(providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert "run on the CPU" in why_not("native-deform", card, gpu_first)
    no_parts = dataclasses.replace(card, manifest=card.manifest.model_copy(update={"parts": {}}))
    assert "no streaming parts" in why_not("onnxruntime", no_parts, OPTIONS)
    assert why_not("onnxruntime-single", no_parts, OPTIONS) is None


def test_probe_windows_are_real_targets_and_reproducible():
    a, b = probe_windows(8), probe_windows(8)
    assert a.shape == (8, 5, 11, 11) and np.array_equal(a, b)
    assert a.max() > 60 and a.min() >= 0 and np.all(a == np.round(a))


@pytest.mark.skipif(not (INT8_MODEL / "manifest.json").is_file(), reason="models/derefnet-int8 not made yet")
def test_int8_model_is_checked_against_its_float32_source_and_refused_without_vnni(tmp_path, monkeypatch):
    if host.has_vnni():
        sel = select_plan(INT8_MODEL, options=OPTIONS, budget_s=0.5)
        rows = {r["plan"]: r for r in sel.report()["candidates"]}
        assert rows["onnxruntime"]["reference"].startswith("derefnet on")  # the fp32 source, not itself
        assert rows["onnxruntime"]["tolerance"] == 0.1
        assert rows["onnxruntime"]["max_rel_error"] < 0.05
    else:
        # the int8 kernels saturate here: every plan fails the check against the float32
        # source, and the model is refused with each plan's reason
        with pytest.raises(ModelError, match="no execution plan gives correct maps.*onnxruntime: maps differ"):
            select_plan(INT8_MODEL, options=OPTIONS, budget_s=0.5)
    # without the float32 source where its manifest says (or with another model there), the
    # CPU's VNNI flag decides
    alone = tmp_path / "models" / INT8_MODEL.name
    shutil.copytree(INT8_MODEL, alone)
    monkeypatch.setattr(host, "has_vnni", lambda: False)
    monkeypatch.setattr("service.engine.select.has_vnni", lambda: False)
    with pytest.raises(ModelError, match="needs a CPU with VNNI"):
        select_plan(alone, options=OPTIONS)
    shutil.copytree(INT8_MODEL, alone.with_name("derefnet"))  # an int8 model is not its float32 source
    assert load_package(alone).manifest.quantized_from.package == "../derefnet"
    with pytest.raises(ModelError, match="needs a CPU with VNNI"):
        select_plan(alone, options=OPTIONS)
