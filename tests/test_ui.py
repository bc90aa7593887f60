"""The browser demo, driven through its API as a remote user would (gradio_client over loopback HTTP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from tokenbridge.checkpoint import SHIPPED
from tokenbridge.ui import MAX_IMAGES, check_request, drop_repeats, launch, load_entries


@pytest.fixture(scope="module")
def client():
    app = launch(sorted(SHIPPED), block=False)  # every family with shipped weights
    assert app.local_url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
    yield Client(app.local_url, verbose=False)
    app.close()


def _images(outputs) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in outputs[:3]]


def _streamed(client, args, api_name: str = "/generate", tries: int = 2) -> list:
    """Every frame of one stream of ``api_name``. gradio_client stores a frame whose files it could not download as
    ``[exception]``: on a loaded machine Gradio can rewrite a cache file while the client still reads it (see
    tokenbridge.ui.drop_repeats). Such a transport failure is retried once; a second one fails, naming it."""
    for _ in range(tries):
        job = client.submit(*args, api_name=api_name)
        steps = job.outputs() if job.result() else []
        failed = [s[0] for s in steps if len(s) == 1 and isinstance(s[0], Exception)]
        if not failed:
            return steps
    raise AssertionError(f"a streamed frame could not be read twice running: {failed[0]!r}")


@pytest.mark.parametrize("name", ["tokenbridge: fmnist", "mar: fmnist-mar", "d2c: fmnist-d2c"])  # family: spec
def test_generate_streams_steps_and_is_deterministic(client, name):
    args = (name, "Dress", 2, 3.0, "linear", 1.0, 3, "random", 5)
    steps = _streamed(client, args)
    # one partial picture per MAR step, then the finished batch
    assert [s[3].split(" - ")[0] for s in steps[:-1]] == [f"step {k} / 3" for k in range(1, 4)]
    assert steps[-1][3].startswith("done: 2 image(s)")
    images, confidence, tokens = _images(steps[-1])
    grid = ((32 + 2) * 1 + 2) * 4, ((32 + 2) * 2 + 2) * 4  # 1 row of 2 images (padding 2), scale 4
    assert images.shape == grid and confidence.shape == grid and tokens.shape == (*grid, 3)
    assert images.dtype == np.uint8 and images.min() < 64 and images.max() > 192  # a real picture, not a flat one
    again = _images(client.predict(*args, api_name="/generate"))
    other = _images(client.predict(*args[:-1], 6, api_name="/generate"))
    assert all(np.array_equal(a, b) for a, b in zip(again, [images, confidence, tokens]))  # same seed
    assert not np.array_equal(other[0], images)  # another seed


def test_bad_requests_get_messages_in_the_page(client):
    # the slider's own bound (Gradio checks it first) or ours: either way a message naming the cap
    with pytest.raises(AppError, match=f"maximum value {MAX_IMAGES}|images must be between 1 and {MAX_IMAGES}"):
        client.predict("tokenbridge: fmnist", "Dress", MAX_IMAGES + 1, 3.0, "linear", 1.0, 4, "random", 0,
                       api_name="/generate")
    with pytest.raises(AppError, match="less than minimum value"):
        client.predict("tokenbridge: fmnist", "Dress", 2, 3.0, "linear", -1.0, 4, "random", 0,
                       api_name="/generate")
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict("tokenbridge: fmnist", "Giraffe", 2, 3.0, "linear", 1.0, 4, "random", 0,
                       api_name="/generate")


def test_requests_are_checked_before_sampling():
    entry = load_entries(["fmnist"])["tokenbridge: fmnist"]
    assert entry.classes[-1] == "(unconditional)" and entry.defaults["num_iter"] == 16  # the recorded defaults
    with pytest.raises(ValueError, match="images must be between 1 and 4"):
        check_request(entry, 0, 5, {}, max_images=4)
    with pytest.raises(ValueError, match="'sampling option.temperature' = nan"):
        check_request(entry, 0, 1, {"temperature": float("nan")}, max_images=4)
    with pytest.raises(ValueError, match="num_iter must be between 1 and 256"):
        check_request(entry, 0, 1, {"num_iter": 1000}, max_images=4)
    assert check_request(entry, 10, 1, {"cfg": 2.0, "unknown": 1}, max_images=4) == {"cfg": 2.0}


def test_unchanged_pictures_are_not_sent_again_except_in_the_last_frame():
    a, b = np.zeros((2, 2)), np.ones((2, 2))
    frames = [(a, a, a, "step 1"), (a, b, a, "step 2"), (b, b, a, "step 3"), (b, b, a, "done")]
    out = list(drop_repeats(iter(frames), "skip"))
    assert [f[3] for f in out] == ["step 1", "step 2", "step 3", "done"]
    assert [[x if isinstance(x, str) else int(x[0, 0]) for x in f[:3]] for f in out] == [
        [0, 0, 0], ["skip", 1, "skip"], [1, "skip", "skip"], [1, 1, 0]]
    assert list(drop_repeats(iter([]), "skip")) == []



def test_edit_streams_the_region_filling_in_and_keeps_the_rest(client):
    from tokenbridge.ui import PAINTED
    args = ("tokenbridge: fmnist", 3, None, "left", None, "Sandal", 2, 3.0, 1.0, 4, 1)
    steps = _streamed(client, args, "/edit")
    assert [s[2].split(" - ")[0] for s in steps[:-1]] == [f"step {k} / 4" for k in range(1, 5)]
    assert steps[-1][2].startswith("done: 2 edit(s)")
    header, last = (np.asarray(Image.open(path)) for path in steps[-1][:2])
    first = np.asarray(Image.open(steps[0][1]))
    assert header.shape == (((32 + 2) + 2) * 4, ((32 + 2) * 2 + 2) * 4)  # original | kept region
    assert last.shape == (((32 + 2) + 2) * 4, ((32 + 2) * 2 + 2) * 4) and last.max() > 192
    # the kept (left) part away from the seam is there from the first step; the right half fills in
    left, right = (slice(8, 8 + 32 * 4), slice(8, 8 + 10 * 4)), (slice(8, 8 + 32 * 4), slice(8 + 20 * 4, 8 + 32 * 4))
    assert np.abs(first[left].astype(int) - last[left].astype(int)).mean() < 8
    assert np.abs(first[right].astype(int) - last[right].astype(int)).mean() > 8
    again = np.asarray(Image.open(client.predict(*args, api_name="/edit")[1]))
    assert np.array_equal(again, last)  # same seed, same edit
    with pytest.raises(AppError, match="nothing painted"):
        client.predict(*args[:3], PAINTED, None, *args[5:], api_name="/edit")


def test_a_painting_regenerates_every_token_it_touches():
    from tokenbridge.ui import painted_keep, picture_to_image
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[0:10, 40:64, 3] = 255  # top right corner painted
    keep = painted_keep({"background": None, "layers": [layer], "composite": None}, 8, 8)
    assert not keep[0:2, 5:].any() and keep[2:].all() and keep[:, :5].all()
    picture = picture_to_image(np.full((50, 70, 3), 255, np.uint8), 32, 1)
    assert picture.shape == (1, 32, 32) and torch.allclose(picture, torch.ones(1, 32, 32))
