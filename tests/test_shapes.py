import numpy as np
import pytest
import torch

from genfast.data.shapes import (
    BACKGROUND_COLORS,
    FULL_CAPTIONS,
    HEADS,
    SHAPE_COLORS,
    SHAPES,
    CaptionStyle,
    Scene,
    ShapesDataset,
    ShapeSpec,
    caption,
    parse_prompt,
    render,
    render_batch,
)


def test_same_seed_same_samples_other_seed_differs():
    a = render_batch(64, seed=3)
    b = render_batch(64, seed=3)
    c = render_batch(64, seed=4)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])
    assert not np.array_equal(a[0], c[0])
    # random access: item i does not depend on which items were read before
    ds = ShapesDataset(100, seed=3)
    img, text, _labels = ds[10]
    assert torch.equal(img, ds[10][0]) and text == a[1][10]
    assert all(ds.scene(i) == ds.sample(i)[2] for i in range(20))


def test_captions_agree_with_labels():
    ds = ShapesDataset(500, seed=0, style=FULL_CAPTIONS)
    for i in range(500):
        _, text, scene = ds.sample(i)
        said = parse_prompt(text)
        labels = scene.labels()
        for head, value in said.items():
            assert HEADS[head].index(value) == labels[head], (text, head)
        assert {"shape", "color", "position", "background"} <= said.keys(), text


def test_every_part_but_the_shape_is_optional():
    scene = Scene((ShapeSpec("circle", "red", "medium", "left"),), "blue")
    bare = caption(scene, style=CaptionStyle(0, 0, 0, 0))
    assert bare == "a circle"
    assert caption(scene, style=CaptionStyle(0, 1, 0, 0)) == "a red circle"
    assert caption(scene, style=FULL_CAPTIONS) == "a red circle on the left on a blue background"


def test_all_attribute_values_occur_and_shape_never_matches_background():
    _, _, labels = render_batch(3000, seed=0)
    for i, head in enumerate(HEADS):
        assert set(labels[:, i]) == set(range(len(HEADS[head]))), head
    colors = [HEADS["color"][c] for c in labels[:, 1]]
    backgrounds = [HEADS["background"][b] for b in labels[:, 4]]
    assert all(c != b for c, b in zip(colors, backgrounds))


@pytest.mark.parametrize("name,channel", [("red", 0), ("green", 1), ("blue", 2)])
def test_colours_have_their_usual_hue(name, channel):
    rgb = np.array(SHAPE_COLORS[name])
    assert rgb.argmax() == channel and rgb[channel] > 1.5 * np.delete(rgb, channel).max()
    yellow = np.array(SHAPE_COLORS["yellow"])
    assert yellow[0] > 200 and yellow[1] > 200 and yellow[2] < 80


def test_shape_is_drawn_in_its_colour_at_its_position():
    scene = Scene((ShapeSpec("square", "blue", "large", "left"),), "white")
    img = render(scene, jitter=False).astype(int)
    assert np.abs(img[32, 18] - SHAPE_COLORS["blue"]).max() <= 1
    assert np.abs(img[32, 60] - BACKGROUND_COLORS["white"]).max() <= 1
    # the four shapes cover different areas of the same box
    areas = {s: (render(Scene((ShapeSpec(s, "red", "large", "center"),), "white"), jitter=False)[..., 1] < 128).sum()
             for s in SHAPES}
    assert len(set(areas.values())) == 4


def test_two_shapes_are_captioned_with_both():
    ds = ShapesDataset(200, seed=0, p_two=1.0)
    _, text, scene = ds.sample(0)
    assert len(scene.shapes) == 2 and " and " in text
    assert parse_prompt(text)["shape"] == scene.shapes[0].shape


def test_dataset_item_types_and_bad_arguments():
    img, text, labels = ShapesDataset(4)[0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
    assert -1.0 <= img.min() and img.max() <= 1.0
    assert isinstance(text, str) and labels.shape == (len(HEADS),)
    with pytest.raises(ValueError, match="length"):
        ShapesDataset(0)
    with pytest.raises(ValueError, match="p_two"):
        ShapesDataset(4, p_two=1.5)
    with pytest.raises(ValueError, match="p_color"):
        CaptionStyle(p_color=2.0)
    with pytest.raises(IndexError):
        ShapesDataset(4)[4]
