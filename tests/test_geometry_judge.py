"""The geometric judge: calibrated on fresh crisp renders, and strict where a lenient measure is not."""

import numpy as np
from scipy import ndimage

from ldm_app.data import shapes
from ldm_app.data.shapes import COLOURS, Scene, ShapeObject, render_scene
from ldm_app.evaluation import adherence, geometry
from ldm_app.evaluation.judge import HEADS

SIDE, SS = 64, 4


def _paint(cover: np.ndarray, rgb, background=(255, 255, 255)) -> np.ndarray:
    """An image from a supersampled coverage mask (SIDE*SS square), box-downsampled like the generator."""
    small = cover.reshape(SIDE, SS, SIDE, SS).mean(axis=(1, 3))[..., None]
    return np.round(small * np.array(rgb) + (1 - small) * np.array(background)).astype(np.uint8)


def _grid(cx=0.5, cy=0.5):
    ys, xs = (np.mgrid[0 : SIDE * SS, 0 : SIDE * SS] + 0.5) / (SIDE * SS)
    return xs - cx, ys - cy


def test_calibration_on_fresh_crisp_renders():
    result = geometry.calibrate(150, 150)  # seed stream of no training set, judge or evaluate prompt
    assert set(result["accuracy"]) >= {f"one/{h}" for h in ("colour", "shape", "size", "position", "background")}
    for name, acc in result["accuracy"].items():
        assert acc >= 0.99, (name, acc)
    assert result["min_solidity"] >= geometry.SOLIDITY_MIN
    assert result["min_iou"] >= min(geometry.IOU_MIN.values())


def test_four_lobed_circle_is_not_a_circle():
    x, y = _grid()
    r, theta = np.hypot(x, y), np.arctan2(y, x)
    lobed = (r <= 0.13 * (1 + 0.12 * np.cos(4 * theta + np.pi / 4))).astype(float)  # a small circle, four lobes
    m = geometry.measure(_paint(lobed, COLOURS["red"]))["objects"][0]
    assert m["fill_shape"] == "circle"  # the fill ratio alone would pass it...
    assert m["shape"] is None  # ...convexity / the template do not
    round_ = (r <= 0.13).astype(float)  # control: the same circle without lobes passes
    assert geometry.measure(_paint(round_, COLOURS["red"]))["objects"][0]["shape"] == "circle"


def test_pinched_square_is_not_a_square():
    x, y = _grid()
    h, d = 0.13, 0.025  # half side, depth of the concave sides
    ax, ay = np.abs(x), np.abs(y)
    pinched = ((ax <= h - d * (1 - (ay / h) ** 2)) & (ay <= h - d * (1 - (ax / h) ** 2))).astype(float)
    m = geometry.measure(_paint(pinched, COLOURS["blue"], (0, 0, 0)))["objects"][0]
    assert m["fill_shape"] == "square"
    assert m["shape"] is None


def test_blurred_triangle_is_not_a_triangle():
    scene = Scene("white", (ShapeObject("triangle", "green", COLOURS["green"], "small", 0.25, (0.5, 0.5), "center"),))
    crisp = np.asarray(render_scene(scene, SIDE), dtype=np.float64)
    assert geometry.measure(crisp)["objects"][0]["shape"] == "triangle"
    blurred = ndimage.gaussian_filter(crisp, sigma=(2.0, 2.0, 0), mode="nearest")  # rounded tips, soft edges
    m = geometry.measure(np.round(blurred).astype(np.uint8))["objects"][0]
    assert m["template_shape"] == "triangle"  # still closest to a triangle...
    assert m["shape"] is None  # ...but not close enough to be called one


def test_colour_drift_from_orange_to_red_is_caught():
    orange, red = np.array(COLOURS["orange"]), np.array(COLOURS["red"])
    def judged(rgb):
        scene = Scene("gray", (ShapeObject("circle", "orange", tuple(int(v) for v in rgb), "large", 0.5, (0.5, 0.5),
                                           "center"),))
        return geometry.measure(render_scene(scene, SIDE))["objects"][0]["colour"]

    assert judged(orange) == "orange"
    assert judged(orange + 0.3 * (red - orange)) == "orange"
    assert judged(orange + 0.6 * (red - orange)) == "red"  # drifted past half-way: named as the neighbour


def test_geometry_judge_heads_and_report_lines():
    import torch

    scenes = [shapes.sample_scene(np.random.default_rng([geometry.CALIBRATION_SEED, 5, i]), SIDE, 0.5)
              for i in range(6)]
    images = adherence.render(scenes, SIDE)
    pred = geometry.GeometryJudge().predict(images)
    assert set(pred) == set(HEADS) and all(v.shape == (6,) and v.dtype == torch.long for v in pred.values())
    prompts = [adherence.Prompt(s.caption, s, 0) for s in scenes]
    summary, records = adherence.score(geometry.GeometryJudge(), prompts, images)
    report = {"settings": {}, "kid": {"generated_vs_real": {"mean": 0, "std": 0}, "real_vs_real": {"mean": 0, "std": 0}},
              "seconds_per_image": 1.0, **summary}
    for part in ("one_object", "two_object"):
        report[part]["accuracy_geometry"] = dict(summary[part]["accuracy"], colour=0.5)
    report["two_object"]["relation_accuracy_geometry"] = 0.25
    text = "\n".join(adherence.summary_lines(report))
    assert "colour 100.0% (judge) / 50.0% (geometry)" in text
    assert "relation 100.0% (judge) / 25.0% (geometry)" in text


def test_a_blank_image_is_scored_wrong_not_a_crash():
    """No object found (a plain background): every head of the geometric judge says "no verdict" (-1), and scoring
    counts the prompt wrong and describes it with "?" instead of failing on the missing position."""
    import torch

    scene = shapes.sample_scene(np.random.default_rng([geometry.CALIBRATION_SEED, 9, 0]), SIDE, 0.0)
    blank = torch.ones(1, 3, SIDE, SIDE)  # white: nothing on it
    pred = geometry.GeometryJudge().predict(blank)
    assert int(pred["position"][0]) == -1
    summary, records = adherence.score(geometry.GeometryJudge(), [adherence.Prompt(scene.caption, scene, 0)], blank)
    assert records[0]["correct"] is False and "?" in records[0]["judged"]
    assert summary["one_object"]["accuracy"]["all_attributes"] == 0.0
