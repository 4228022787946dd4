"""The scenes of the shipped `shapes` model and the analyser that judges its pictures (no weights)."""

import numpy as np
import pytest

from stable_diffusion import scenes


def test_every_caption_is_one_of_the_prompt_form():
    captions = scenes.all_captions()
    assert len(captions) == 6 * 3 * 5 == len(set(captions))
    assert "a red circle on a blue background" in captions
    assert "a red circle on a red background" not in captions


@pytest.mark.parametrize("caption", scenes.all_captions())
def test_the_analyser_reads_every_drawn_scene_back(caption):
    """Every caption, at the smallest and largest size and with the colours jittered."""
    words = caption.split()
    colour, shape, background = words[1], words[2], words[5]
    rng = np.random.default_rng(len(caption))
    for size in (0.15, 0.325):
        scene = scenes.random_scene(rng, shape=shape, colour=colour, background=background)
        scene = scene._replace(radius=size * scenes.SIZE)
        reading = scenes.analyse(scenes.draw(scene, rng))
        assert (reading.shape, reading.colour, reading.background) == (shape, colour, background), reading


def test_the_analyser_tells_what_is_not_the_scene():
    """A flat picture has no shape; a picture of another scene reads as that scene."""
    flat = np.full((scenes.SIZE, scenes.SIZE, 3), scenes.COLOURS["blue"], dtype=np.uint8)
    assert scenes.analyse(flat) == scenes.Reading(None, None, "blue", 0.0)
    rng = np.random.default_rng(0)
    scene = scenes.random_scene(rng, shape="square", colour="yellow", background="black")
    assert scenes.analyse(scenes.draw(scene)).shape == "square"
    assert scenes.analyse(scenes.draw(scene._replace(shape="triangle"))).shape == "triangle"
    noise = rng.integers(0, 256, size=(scenes.SIZE, scenes.SIZE, 3), dtype=np.uint8)
    assert scenes.analyse(noise).shape in (None, "square", "circle", "triangle")


def test_the_analyser_reads_the_models_rounded_corners_and_specks():
    """The model's squares have rounded corners and its pictures specks of the shape's colour: a
    reading by the box's fill alone took 13 of its 90 captions' pictures for other shapes (a
    rounded square fills 0.85 of its box, under a square's 0.9; one speck in a corner made a
    circle's box four times its size)."""
    rng = np.random.default_rng(3)
    square = scenes.Scene("square", "green", "black", (64.0, 64.0), 30.0)
    picture = scenes.draw(square)
    y, x = np.mgrid[:scenes.SIZE, :scenes.SIZE] + 0.5
    corners = np.maximum(np.abs(x - 64) - 8, 0) ** 2 + np.maximum(np.abs(y - 64) - 8, 0) ** 2 > 22 ** 2
    picture[corners] = scenes.COLOURS["black"]
    assert scenes.analyse(picture).fill < 0.9 and scenes.analyse(picture).shape == "square"
    for shape in scenes.SHAPES:
        picture = scenes.draw(scenes.Scene(shape, "green", "black", (70.0, 70.0), 25.0), rng)
        picture[3:6, 3:6] = scenes.COLOURS["green"]  # a speck far from the shape
        reading = scenes.analyse(picture)
        assert (reading.shape, reading.colour, reading.background) == (shape, "green", "black")


def test_scenes_are_drawn_the_same_from_the_same_seed():
    a, captions_a = scenes.batch(np.random.default_rng(7), 4)
    b, captions_b = scenes.batch(np.random.default_rng(7), 4)
    assert np.array_equal(a, b) and captions_a == captions_b
    assert a.shape == (4, scenes.SIZE, scenes.SIZE, 3) and a.dtype == np.uint8


def test_a_shape_lies_inside_the_picture_and_a_hidden_one_is_refused():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = scenes.random_scene(rng)
        cover = scenes.coverage(scene)
        assert cover[0].max() == cover[-1].max() == cover[:, 0].max() == cover[:, -1].max() == 0
        assert cover.sum() > 0.1 * (scene.radius * 2) ** 2
    with pytest.raises(ValueError, match="cannot be seen"):
        scenes.random_scene(rng, colour="red", background="red")


def test_what_the_shipped_model_never_saw_is_named():
    """A prompt or a size outside its training gets a confident picture; a note says so."""
    assert scenes.outside_training({"prompt": "A Red Circle on a blue background."}, (128, 128)) == []
    words, = scenes.outside_training({"prompt": "a purple star on a orange background"}, (128, 128))
    assert words.startswith("the shapes model never saw 'purple', 'star', 'orange' (in the prompt): it knows")
    # words as typed (an accent, digits), the negative prompt's too; none where a text is None
    words, = scenes.outside_training({"prompt": "a RED círcle, 2 cats", "negative prompt": "blurry cat",
                                      "inversion prompt": None}, (128, 128))
    assert "never saw 'círcle', '2', 'cats' (in the prompt); 'blurry', 'cat' (in the negative prompt):" in words
    # An embedding's token has been taught since: not named (nor the words inside <cat-toy>)
    words, = scenes.outside_training({"prompt": "a mystyle <Cat-Toy> circle on a blue background, cat"}, (128, 128),
                                     ["MyStyle", "<cat-toy>"])
    assert "never saw 'cat' (in the prompt)" in words
    # a token of three vectors teaches three words; 'qzxv_1' was read as qzxv and '_1'
    words, = scenes.outside_training({"prompt": "a qzxv_1 circle on a blue background, dog"}, (128, 128),
                                     ["qzxv", "qzxv_1", "qzxv_2"])
    assert "never saw 'dog' (in the prompt):" in words
    size, = scenes.outside_training({"prompt": "a red circle on a blue background"}, (128, 384))
    assert size == "the shapes model was trained at 128x128; at 384x128 (width x height) it may draw no shape, or more than one"
    words, = scenes.outside_training({"prompt": "a red circle 2.5 x-ray " + "z" * 2000}, (128, 128))
    assert "never saw '2.5', 'x-ray', '" + "z" * 27 + "...' (in the prompt)" in words and len(words) < 400
    many = scenes.outside_training({"prompt": " ".join(f"w{k}" for k in range(20))}, (64, 64))
    assert len(many) == 2 and "'w7' and 12 more (in the prompt)" in many[0]
