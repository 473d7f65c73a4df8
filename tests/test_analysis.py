"""Route analysis: kNN / purity / baselines on constructed data, figures, and `analyze` end to end.

No checkpoint or data package is needed: models are built in process, images are synthetic.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import resetnet
from resetnet.analysis import (
    RouteLayout,
    class_mean_routes,
    collect_routes,
    count_distinct_routes,
    distinct_routes_per_class,
    hard_routes,
    layout_of_model,
    load_policy_log,
)
from resetnet.models.cifar import CifarNet, StageSpec
from resetnet_experiments.analysis import cluster_purity, kmeans, knn_accuracy, knn_classify, knn_search, random_routes, vote
from resetnet_experiments.analysis.command import FILES, analyze_model, analyze_run, pick_queries
from resetnet_experiments.analysis.figures import figure_size, policy_evolution_figure

imread = pytest.importorskip("matplotlib.image").imread


def png_shape(path) -> tuple[int, int]:
    return imread(str(path)).shape[:2]


def tiny_three_stage() -> CifarNet:
    """Three ReSet stages of different shapes, narrow enough to run in a blink."""
    torch.manual_seed(0)
    return CifarNet([StageSpec(8, units=2, iterations=2), StageSpec(8, units=2, iterations=3), StageSpec(16, units=3, iterations=2)], stem_width=8)


def synthetic_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def label_routes(labels: np.ndarray, layout: RouteLayout, seed: int = 0, noise: float = 0.02) -> np.ndarray:
    """Routes determined by the label: in every score vector the unit (label + j) % outputs dominates."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(labels), layout.dim), dtype=np.float32)
    for mi, j, cols in layout.blocks():
        outputs = cols.stop - cols.start
        block = np.full((len(labels), outputs), noise / outputs)
        block[np.arange(len(labels)), (labels * (mi + 1) + j) % outputs] += 1 - noise
        block += rng.uniform(0, noise, block.shape)
        out[:, cols] = block / block.sum(1, keepdims=True)
    return out


LAYOUT = RouteLayout.from_shapes([(3, 4), (4, 6)], names=["stage 1", "stage 2"])  # D = 12 + 24


# ------------------------------------------------------------------ nearest neighbours
def test_knn_search_is_l1_and_excludes_the_query():
    # from the origin: a=(1, 1) is nearer in L2 (1.41 < 1.8), b=(1.8, 0) is nearer in L1 (1.8 < 2)
    pts = np.array([[0.0, 0.0], [1.0, 1.0], [1.8, 0.0], [5.0, 5.0]])
    d1, i1 = knn_search(pts, k=1)  # index=None: the set itself, the query excluded
    assert i1[0, 0] == 2 and d1[0, 0] == pytest.approx(1.8)
    _, i2 = knn_search(pts, k=1, p=2)
    assert i2[0, 0] == 1  # the construction does separate the metrics
    # self excluded, but an exact duplicate of the query is a legitimate (distance-0) neighbour
    dup = np.vstack([pts, pts[:1]])
    d, i = knn_search(dup, k=2)
    assert i[0, 0] == 4 and d[0, 0] == 0 and 0 not in i[0]
    assert i[4, 0] == 0 and 4 not in i[4]
    # a separate index keeps the identical point
    _, i = knn_search(pts[:1], pts, k=1)
    assert i[0, 0] == 0


def test_knn_search_chunked_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(57, 5)).astype(np.float32)
    full = np.abs(x[:, None, :] - x[None, :, :]).sum(-1)
    np.fill_diagonal(full, np.inf)
    want = np.argsort(full, axis=1, kind="stable")[:, :4]
    d, i = knn_search(x, k=4, query_chunk=7, index_chunk=13)
    np.testing.assert_array_equal(i, want)
    np.testing.assert_allclose(d, np.take_along_axis(full, want, 1), rtol=1e-5)
    with pytest.raises(ValueError, match="k must be"):
        knn_search(x[:3], k=3)  # only 2 others
    with pytest.raises(ValueError, match="same D"):
        knn_search(x, x[:, :2], k=1)


def test_vote_majority_and_tie_break():
    assert vote(np.array([[1, 2, 2, 1, 3]]), 4).tolist() == [1]  # 2-2 tie: class 1's neighbour is nearest
    assert vote(np.array([[3, 2, 2, 1, 2]]), 4).tolist() == [2]
    assert vote(np.array([[0, 5, 5]]), 6).tolist() == [5]


def test_knn_accuracy_label_routes_perfect_random_routes_chance():
    rng = np.random.default_rng(0)
    labels, index_labels = rng.integers(0, 10, 2000), rng.integers(0, 10, 2000)
    routes, index = label_routes(labels, LAYOUT, 1), label_routes(index_labels, LAYOUT, 2)
    assert knn_accuracy(routes, labels, index, index_labels, k=5) == 1.0
    assert knn_accuracy(routes, labels, k=5) == 1.0  # leave-one-out on the set itself
    noise = rng.dirichlet(np.ones(4), size=(2000, 9)).reshape(2000, 36)
    assert abs(knn_accuracy(noise, labels, k=5) - 0.1) < 0.05
    # the random-route baseline of label-determined routes is at chance too
    rand = random_routes(routes, LAYOUT, seed=3)
    rand_index = random_routes(index, LAYOUT, seed=4)
    assert abs(knn_accuracy(rand, labels, rand_index, index_labels, k=5) - 0.1) < 0.05
    pred = knn_classify(routes[:10], index, index_labels, k=5)
    np.testing.assert_array_equal(pred, labels[:10])


# ------------------------------------------------------------------ clustering
def test_cluster_purity_by_hand():
    assert cluster_purity([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 2]) == pytest.approx(4 / 6)
    assert cluster_purity([0, 1, 2], [5, 5, 5]) == 1.0
    with pytest.raises(ValueError):
        cluster_purity([0, 1], [0])


def test_kmeans_recovers_label_routes_and_random_is_low():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    routes = label_routes(labels, LAYOUT)
    assign, centres, inertia = kmeans(routes, 10, seed=0)
    assert centres.shape == (10, LAYOUT.dim) and inertia >= 0
    assert cluster_purity(assign, labels) == 1.0
    again, _, _ = kmeans(routes, 10, seed=0)
    np.testing.assert_array_equal(assign, again)  # seeded
    rand = random_routes(routes, LAYOUT, seed=1)
    assert cluster_purity(kmeans(rand, 10, seed=0)[0], labels) < 0.2
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(routes[:3], 4)


def test_random_route_modes_keep_the_marginals():
    rng = np.random.default_rng(0)
    routes = label_routes(rng.integers(0, 10, 500), LAYOUT)
    blocks = random_routes(routes, LAYOUT, seed=0, mode="blocks")
    for _, _, cols in LAYOUT.blocks():
        a, b = routes[:, cols], blocks[:, cols]
        np.testing.assert_allclose(b.sum(1), 1, rtol=1e-5)
        np.testing.assert_array_equal(np.unique(a, axis=0), np.unique(b, axis=0))  # same score vectors, reordered
    assert not np.array_equal(blocks, routes)
    cols = random_routes(routes, LAYOUT, seed=0, mode="columns")
    np.testing.assert_array_equal(np.sort(cols, 0), np.sort(routes, 0))
    sample = random_routes(routes, LAYOUT, seed=0, mode="sample")
    for _, _, c in LAYOUT.blocks():
        assert set(np.unique(sample[:, c])) <= {0.0, 1.0} and (sample[:, c].sum(1) == 1).all()
        np.testing.assert_allclose(sample[:, c].mean(0), routes[:, c].mean(0), atol=0.08)
    with pytest.raises(ValueError, match="mode"):
        random_routes(routes, LAYOUT, mode="nope")


# ------------------------------------------------------------------ hard and per-class routes
def test_hard_routes_distinct_count_and_class_means():
    layout = RouteLayout.from_shapes([(2, 3), (1, 2)])  # D = 6 + 2, hard route = 3 choices

    def route(a, b, c):
        v = np.zeros(8)
        v[a] = v[3 + b] = v[6 + c] = 1.0
        return v

    routes = np.array([route(0, 1, 0), route(0, 1, 0), route(2, 2, 1), route(0, 1, 1), route(2, 2, 1)])
    labels = np.array([0, 0, 1, 1, 1])
    hard = hard_routes(routes, layout)
    assert hard.tolist() == [[0, 1, 0], [0, 1, 0], [2, 2, 1], [0, 1, 1], [2, 2, 1]]
    assert count_distinct_routes(hard) == 3
    assert distinct_routes_per_class(hard, labels, 3).tolist() == [1, 2, 0]
    means, counts = class_mean_routes(routes, labels, 3)
    assert counts.tolist() == [2, 3, 0]
    np.testing.assert_allclose(means[0], route(0, 1, 0))
    np.testing.assert_allclose(means[1], (2 * route(2, 2, 1) + route(0, 1, 1)) / 3)
    assert np.isnan(means[2]).all()


# ------------------------------------------------------------------ collecting routes from a model
def test_collect_routes_matches_the_model():
    model = resetnet.create_model("reset_t3_2cu3it").eval()
    images, labels = synthetic_images(21)
    rs = collect_routes(model, images, labels, batch_size=8, features=True, progress=False)
    layout = layout_of_model(model)
    assert [m.name for m in layout.modules] == ["stage 1"] and layout.dim == 3 * 3
    assert rs.routes.shape == (21, 9) and rs.features.shape == (21, 64) and rs.predictions.shape == (21,)
    np.testing.assert_allclose(rs.routes.reshape(21, 3, 3).sum(-1), 1, rtol=1e-5)
    from resetnet.analysis.routes import cifar10_normalization, normalize_images

    x = normalize_images(images[:5], *cifar10_normalization())
    with torch.no_grad():
        logits, routing = model(x, return_routing=True)
        pooled = model.forward_features(x).mean(dim=(2, 3))
    np.testing.assert_allclose(rs.routes[:5], routing[0].weights.reshape(5, -1).numpy(), atol=1e-5)
    np.testing.assert_allclose(rs.features[:5], pooled.numpy(), atol=1e-4)
    np.testing.assert_array_equal(rs.predictions[:5], logits.argmax(1).numpy())
    with pytest.raises(ValueError, match="uint8"):
        collect_routes(model, images.astype(np.float32), labels, progress=False)
    with pytest.raises(ValueError, match="no ReSet"):
        layout_of_model(resetnet.create_model("resnet20"))


# ------------------------------------------------------------------ policy evolution
def write_metrics(path, shapes=((5, 6), (5, 6), (5, 6)), steps=range(0, 2000, 100), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in steps:
        mw = [rng.dirichlet(np.ones(o), size=k).tolist() for k, o in shapes]
        rows.append(json.dumps({"kind": "routing", "step": s, "mean_weights": mw}))
        rows.append(json.dumps({"kind": "train", "step": s, "loss": 2.3}))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_load_policy_log(tmp_path):
    path = write_metrics(tmp_path / "metrics.jsonl", shapes=((2, 3), (3, 4)), steps=[200, 0, 100])
    # a resumed run repeats step 100 (the later row wins) and a killed run leaves a partial line
    with open(path, "a") as f:
        f.write(json.dumps({"kind": "routing", "step": 100, "mean_weights": [[[1, 0, 0]] * 2, [[0, 0, 0, 1]] * 3]}) + "\n")
        f.write('{"kind": "routing", "st')
    steps, weights = load_policy_log(tmp_path)  # a run directory works too
    assert steps.tolist() == [0, 100, 200]
    assert [w.shape for w in weights] == [(3, 2, 3), (3, 3, 4)]
    assert weights[0][1, 0].tolist() == [1, 0, 0]
    assert load_policy_log(path, meta=True)[2] == {"modules": None, "zero_unit": None}
    # the trainer's rows also name the modules and say which have a zero unit
    named = tmp_path / "named.jsonl"
    named.write_text(
        json.dumps(
            {
                "kind": "routing",
                "step": 5,
                "mean_weights": [[[0.04, 0.96]], [[0.04, 0.96]]],
                "modules": ["stages.0", "stages.2"],
                "zero_unit": [True, False],
            }
        )
        + "\n"
    )
    steps, weights, info = load_policy_log(named, meta=True)
    assert info == {"modules": ["stage 1", "stage 3"], "zero_unit": [True, False]}
    analyze_run(named, tmp_path / "named_out")
    report = (tmp_path / "named_out" / "report.md").read_text()
    assert "stage 1 picks zero unit" in report and "stage 3 picks CU 2" in report  # stage 3 has no zero unit
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"kind": "routing", "step": 0, "mean_weights": [[[0.5, 0.5]]]})
        + "\n"
        + json.dumps({"kind": "routing", "step": 1, "mean_weights": [[[0.5, 0.25, 0.25]]]})
        + "\n"
    )
    with pytest.raises(ValueError, match="differ"):
        load_policy_log(bad)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"kind": "train", "step": 0}) + "\n")
    with pytest.raises(ValueError, match="no rows"):
        load_policy_log(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError):
        load_policy_log(tmp_path / "missing.jsonl")


def test_policy_evolution_figure_size(tmp_path):
    steps, weights = load_policy_log(write_metrics(tmp_path / "metrics.jsonl"))
    fig = policy_evolution_figure(steps, weights, tmp_path / "fig6.png", module_names=["stage 1", "stage 2", "stage 3"])
    assert fig.size == figure_size("policy", rows=3, cols=5) == (650, 1475)  # the paper's 3 x 5 grid for ReSet-38
    assert png_shape(fig.path) == fig.size


def test_analyze_run_and_cli_policy_only(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_metrics(run_dir / "metrics.jsonl", shapes=((2, 3), (3, 4)))
    from resetnet.cli import main

    assert main(["analyze", "--run", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert png_shape(out / FILES["fig6"]) == figure_size("policy", rows=2, cols=3)
    report = (out / "report.md").read_text()
    assert f"]({FILES['fig6']})" in report and "At step 1900" in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["logged_steps"] == 20 and summary["last_step"] == 1900
    assert main(["analyze", "--out", str(out)]) == 2  # neither a checkpoint nor --run
    summary = analyze_run(run_dir / "metrics.jsonl", tmp_path / "out2", module_names=["stage 1", "stage 3"])
    assert "stage 3" in (tmp_path / "out2" / "report.md").read_text()


# ------------------------------------------------------------------ end to end
def test_analyze_model_writes_every_file(tmp_path):
    model = tiny_three_stage()
    images, labels = synthetic_images(48, seed=1)
    index_images, index_labels = synthetic_images(64, seed=2)
    metrics = write_metrics(tmp_path / "metrics.jsonl", shapes=((2, 3), (3, 3), (2, 4)), steps=range(0, 600, 100))
    out = tmp_path / "analysis"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    summary = analyze_model(
        model,
        images,
        labels,
        out,
        index_images=index_images,
        index_labels=index_labels,
        class_names=names,
        queries=[3, 17],
        seed=0,
        batch_size=20,
        metrics_path=metrics,
        checkpoint="in-process",
    )
    layout = layout_of_model(model)
    assert layout.dim == 2 * 3 + 3 * 3 + 2 * 4

    routes = np.load(out / "routes.npy")
    assert routes.shape == (48, layout.dim) and routes.dtype == np.float32
    rs = collect_routes(model, images, labels, progress=False)
    np.testing.assert_allclose(routes, rs.routes, atol=1e-6)
    csv = (out / "routes.csv").read_text().splitlines()
    assert csv[0].split(",")[:4] == ["index", "label", "prediction", "m1_it1_cu1"] and csv[0].endswith("m3_it2_zero")
    assert len(csv) == 49 and csv[4].split(",")[:2] == ["3", str(labels[3])]

    expected = {
        "fig4": figure_size("score_std", layout),
        "fig5": figure_size("nearest", layout, queries=2, neighbours=5),
        "fig6": figure_size("policy", rows=3, cols=3),
        "class_routes": figure_size("class_routes", layout, classes=10),
    }
    assert expected["fig4"] == (400, 1300)
    for key, size in expected.items():
        assert png_shape(out / FILES[key]) == size, key

    saved = json.loads((out / "summary.json").read_text())
    for key in (
        "knn_accuracy",
        "knn_accuracy_random_routes",
        "knn_accuracy_features",
        "cluster_purity",
        "cluster_purity_random_routes",
        "distinct_hard_routes",
        "n_images",
        "n_index",
        "split",
        "checkpoint",
    ):
        assert key in saved, key
    assert saved == json.loads(json.dumps(summary))
    assert saved["n_images"] == 48 and saved["n_index"] == 64 and saved["split"] == "test"
    assert saved["checkpoint"] == "in-process" and saved["queries"] == [3, 17]
    assert saved["distinct_hard_routes"] == count_distinct_routes(hard_routes(routes, layout))
    for key in ("knn_accuracy", "knn_accuracy_random_routes", "knn_accuracy_features", "cluster_purity"):
        assert 0.0 <= saved[key] <= 1.0
    report = (out / "report.md").read_text()
    for name in FILES.values():
        assert f"]({name})" in report
    assert "largest score spread" in report and "distinct hard routes" in report


def test_analyze_model_leave_one_out_and_bad_input(tmp_path):
    model = resetnet.create_model("reset_t3_2cu3it")
    images, labels = synthetic_images(24, seed=3)
    summary = analyze_model(model, images, labels, tmp_path / "loo", num_queries=2, seed=5)
    assert summary["n_index"] == 23 and "leave-one-out" in summary["index_description"]
    assert summary["queries"] == pick_queries(24, None, 2, 5)
    assert png_shape(tmp_path / "loo" / FILES["fig4"]) == (400, 550)
    assert not (tmp_path / "loo" / FILES["fig6"]).exists()
    with pytest.raises(ValueError, match="out of range"):
        analyze_model(model, images, labels, tmp_path / "bad", queries=[24])
    with pytest.raises(ValueError, match="uint8"):
        analyze_model(model, images.astype(np.float32), labels, tmp_path / "bad")


def test_cli_checkpoint_path_with_stand_in_packages(tmp_path, monkeypatch):
    """`resetnet analyze CHECKPOINT --run RUN` wiring, with stand-ins for the train and data packages."""
    import sys
    import types

    calls = {}

    def load_model(path, device="cpu"):
        calls["checkpoint"] = (str(path), device)
        return tiny_three_stage(), {"config": {"model": "tiny"}}

    def load_cifar10(root, split, download=False):
        calls.setdefault("splits", []).append(split)
        return synthetic_images(50 if split == "test" else 70, seed=len(split))

    class DataError(RuntimeError):
        pass

    data = types.ModuleType("resetnet.data")
    data.load_cifar10, data.DataError, data.resolve_data_dir = load_cifar10, DataError, lambda d=None: tmp_path
    data.CLASSES = tuple(f"c{i}" for i in range(10))
    data.CIFAR10_MEAN, data.CIFAR10_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    monkeypatch.setitem(sys.modules, "resetnet.data", data)
    import resetnet.models

    monkeypatch.setattr(resetnet.models, "load_model", load_model)

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.json").write_text("{}")  # the run's checkpoint pointer (the stand-in loader reads nothing)
    write_metrics(run_dir / "metrics.jsonl", shapes=((2, 3), (3, 3), (2, 4)), steps=range(0, 500, 100))
    out = tmp_path / "out"
    from resetnet.cli import build_parser
    from resetnet_experiments.analysis.command import run

    args = build_parser().parse_args(
        [
            "analyze",
            "--run",
            str(run_dir),
            "--out",
            str(out),
            "--limit",
            "30",
            "--index-limit",
            "40",
            "--num-queries",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "--seed",
            "1",
        ]
    )
    assert run(args) == 0
    assert calls["checkpoint"] == (str(run_dir), torch.device("cpu")) and calls["splits"] == ["test", "train"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 30 and summary["n_index"] == 40 and summary["checkpoint"] == str(run_dir)
    assert summary["distinct_hard_routes_per_class"].keys() == {f"c{i}" for i in range(10)}
    for name in FILES.values():
        assert (out / name).is_file(), name
    # stage names from the model label Figure 6's rows when the log matches its modules
    assert "stage 3" in (out / "report.md").read_text().split("Figure 6")[-1]
    args = build_parser().parse_args(["analyze", str(run_dir), "--out", str(tmp_path / "o2"), "--limit", "0"])
    assert run(args) == 2
