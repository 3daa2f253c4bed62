"""The streaming parts (encoder + head) of a real, tiny DeRefNet export, in the service.

Checks that the model loader verifies the parts like the main file, that encoder + head equal
the single graph, and that through a real server the feature cache gives the same answers as
the single graph while encoding each frame exactly once (WebSocket) or once per request (REST).
"""

from __future__ import annotations

import asyncio
import shutil

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from websockets.asyncio.client import connect

from service.kernels import deform
from service.modelpkg.manifest import load_package
from service.modelpkg.model import ModelError, load_model
from service.science.background import condition
from service.science.physics import DEFAULT_SNR
from service.science.postprocess import find_targets
from service.science.windows import sequence_windows
from tests.service.api.test_ws import end_msg, frame_msg, recv
from tests.service.conftest import LiveServer, simulate_track
from tests.service.tiny_derefnet import tiny_model_path

pytest.importorskip("torch", reason="exporting the tiny model needs torch (not in the service image)")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_model_path(tmp_path_factory)


@pytest.fixture
def tiny_server(tiny_model):
    started = []

    def start(**overrides) -> LiveServer:
        from service.runtime.config import Settings

        values = {
            "model_path": tiny_model,
            "max_batch_wait_ms": 2.0,
            "drain_s": 0.0,
            "plan_budget_s": 0.5,
            "deadline_ms": 0.0,
        }
        live = LiveServer(Settings(**{**values, **overrides})).start()
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


def test_loader_verifies_and_uses_the_parts(tiny_model):
    model = load_model(tiny_model)
    assert model.has_parts
    windows = sequence_windows(simulate_track(9, seed=1).astype(np.float32))[0]
    feats = model.encode(windows.reshape(-1, 11, 11))
    assert feats.shape == (45, 33 * 33)
    split = model.head(feats.reshape(9, 5, -1))
    single = model.run(windows)
    assert np.abs(split - single).max() < 1e-3
    assert np.abs(single).max() > 50  # a real map, not zeros
    assert load_package(tiny_model).provenance.export["parts"]["max_abs_diff_vs_single_graph"] < 1e-3
    assert not load_model(tiny_model, parts=False).has_parts


def test_head_has_folded_gates_and_no_symmetry_branch(tiny_model):
    import onnx

    package = load_package(tiny_model)
    enc = onnx.load(str(tiny_model / package.parts["encoder"].file))
    head = onnx.load(str(tiny_model / package.parts["head"].file))
    enc_ops = [n.op_type for n in enc.graph.node]
    head_ops = [n.op_type for n in head.graph.node]
    assert enc_ops.count("Conv") == 4 * package.manifest.interface.config["stages"]  # 5 would be the symmetry
    assert "DeformConv" not in enc_ops and head_ops.count("DeformConv") == 2
    # The 1089x1089 Linear of the position encoding is folded away: no such weight in the head.
    big = [i.name for i in head.graph.initializer if 1089 * 1089 <= np.prod(i.dims)]
    assert big == [] and "Sigmoid" in head_ops  # (the attention's sigmoid stays)
    sess = ort.InferenceSession(str(tiny_model / package.parts["head"].file))
    assert [i.name for i in sess.get_inputs()] == ["features"]


def test_part_with_wrong_hash_or_missing_is_refused(tiny_model, tmp_path):
    folder = tmp_path / "derefnet"
    shutil.copytree(tiny_model, folder)
    with open(folder / "head.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="SHA-256 mismatch: model part .*head.onnx"):
        load_model(folder)
    (folder / "encoder.onnx").unlink()
    with pytest.raises(ModelError, match="model part 'encoder' not found"):
        load_model(folder)
    # without the feature cache the parts are not even opened
    assert not load_model(folder, parts=False).has_parts


def expected_targets(tiny_model, frames) -> list[list[list[float]]]:
    """Answers from the single graph + the one post-processing path (the manifest's defaults and the
    service's default threshold, relative to each window's noise)."""
    package = load_package(tiny_model)
    sess = ort.InferenceSession(str(package.model_file), providers=["CPUExecutionProvider"])
    windows = sequence_windows(frames.astype(np.float32))[0]
    maps = sess.run(None, {"lr": condition(windows)})[0]
    pp = package.postprocess
    found = find_targets(maps, windows, threshold=pp.threshold, refine=pp.refine, snr=DEFAULT_SNR)
    return [f.tolist() for f in found]


def targets_rows(targets: list[dict]) -> list[list[float]]:
    return [[t["x"], t["y"], t["brightness"]] for t in targets]


@pytest.mark.parametrize("plan", ["auto", "onnxruntime", "native-deform"])
def test_stream_encodes_each_frame_once_and_matches_the_single_graph(tiny_model, tiny_server, plan):
    """With the native float32 DeformConv the head runs whole (the halves are split for the AMX
    kernels only); with ONNX Runtime's, the halves run (pairs). Whichever plan ``auto`` picks,
    the answers are the single graph's."""
    if plan == "native-deform" and not deform.AVAILABLE:
        pytest.skip("the native kernel service.kernels._deform is not built (no C compiler at install)")
    live = tiny_server(plan=plan, plan_budget_s=0.5)
    assert plan == "auto" or live.runtime.selection.plan.name == plan
    batcher = live.runtime.batcher
    assert batcher.caches_features
    assert batcher.caches_pairs == (live.runtime.model.split_head is None)
    tracks = {"a": simulate_track(11, seed=21), "b": simulate_track(7, seed=22, n_targets=2)}

    async def main():
        got = {t: [] for t in tracks}
        async with connect(live.ws_url) as ws:
            for i in range(11):
                for t, frames in tracks.items():
                    if i < len(frames):
                        await ws.send(frame_msg(t, i, frames[i]))
            for t in tracks:
                await ws.send(end_msg(t))
            ended = 0
            while ended < len(tracks):
                m = await recv(ws)
                if m["type"] == "ended":
                    ended += 1
                else:
                    assert m["type"] == "result", m
                    got[m["track_id"]].append(m)
        return got

    got = asyncio.run(main())
    assert batcher.frames_encoded == 11 + 7  # every frame once, though it is in 5 windows
    assert batcher.windows_run == 11 + 7
    assert batcher.pairs_aligned == (4 * (11 + 7) if batcher.caches_pairs else 0)  # every neighbour once
    n_found = 0
    for t, frames in tracks.items():
        want = expected_targets(tiny_model, frames)
        rows = [targets_rows(m["targets"]) for m in got[t]]
        assert [m["frame_index"] for m in got[t]] == list(range(len(frames)))
        for r, w in zip(rows, want, strict=True):
            np.testing.assert_allclose(np.array(r).reshape(-1, 3), np.array(w).reshape(-1, 3), atol=1e-3, rtol=1e-4)
            n_found += len(w)
    assert n_found > 0


def test_rest_encodes_each_distinct_frame_once_per_request(tiny_model, tiny_server):
    cached, plain = tiny_server(plan="onnxruntime"), tiny_server(plan="onnxruntime-single")
    assert cached.runtime.batcher.caches_features and not plain.runtime.batcher.caches_features
    frames = simulate_track(8, seed=31)
    # a gap after frame 4 makes two segments: 5 + 3 frames, still 8 distinct frames
    body = {"frames": [{"patch": f.tolist(), "frame_index": i if i < 5 else i + 10} for i, f in enumerate(frames)]}
    answers = []
    for live in (cached, plain):
        r = httpx.post(f"{live.base_url}/unmix", json=body)
        assert r.status_code == 200, r.text
        answers.append([targets_rows(x["targets"]) for x in r.json()["results"]])
    assert cached.runtime.batcher.frames_encoded == 8
    assert plain.runtime.batcher.frames_encoded == 0 and plain.runtime.batcher.windows_run == 8
    r = httpx.post(f"{cached.base_url}/unmix", json=body)  # a new request encodes anew
    assert cached.runtime.batcher.frames_encoded == 16
    for a, b in zip(*answers, strict=True):
        np.testing.assert_allclose(np.array(a).reshape(-1, 3), np.array(b).reshape(-1, 3), atol=1e-3, rtol=1e-4)
    assert sum(len(a) for a in answers[0]) > 0


def test_paced_stream_aligns_neighbours_before_their_window_is_complete(tiny_model, tiny_server):
    """At a tracker's pace (the next frame after the answers), every window's neighbours are
    aligned as soon as they are here (the first three of every window but the last, whose last
    two come with the end), and the answers are still the single graph's."""
    live = tiny_server(plan="onnxruntime")
    batcher = live.runtime.batcher
    assert batcher.caches_pairs
    frames = simulate_track(9, seed=41)

    async def settle(i):  # frame i's early work (windows i - 1 and i) is done
        for _ in range(500):
            if batcher.early_pairs >= 3 * i + 2:
                return
            await asyncio.sleep(0.01)

    async def main():
        got = []
        async with connect(live.ws_url) as ws:
            for i, frame in enumerate(frames):
                await ws.send(frame_msg("p", i, frame))
                if i >= 2:
                    got.append(await recv(ws))
                await settle(i)
            await ws.send(end_msg("p"))
            while len(got) < len(frames) + 1:
                got.append(await recv(ws))
        return got

    got = asyncio.run(main())
    results = [m for m in got if m["type"] == "result"]
    assert [m["frame_index"] for m in results] == list(range(len(frames)))
    n = len(frames)
    assert batcher.early_pairs == 3 * (n - 1) + 2 and batcher.pairs_aligned == 4 * n
    for m, want in zip(results, expected_targets(tiny_model, frames), strict=True):
        np.testing.assert_allclose(
            np.array(targets_rows(m["targets"])).reshape(-1, 3), np.array(want).reshape(-1, 3), atol=1e-3, rtol=1e-4
        )


def test_pair_cache_off_runs_the_head(tiny_model, tiny_server):
    live = tiny_server(pair_cache=False, plan="onnxruntime")
    assert live.runtime.model.has_pairs and not live.runtime.batcher.caches_pairs
    assert live.runtime.batcher.caches_features
