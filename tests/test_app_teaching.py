"""The app's teaching views through a real server and gradio_client: noise-and-denoise
(/renoise) and the likelihood table (/likelihood), before / after / oracle on the built-in model.

The server and client fixtures are test_app.py's (the built-in model with quick settings)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from retrack.cli import main
from test_app import MODEL, client, pytestmark_server, server  # noqa: F401  (fixtures)

pytestmark = [pytestmark_server]


@pytest.fixture(scope="module")
def unlearned(tmp_path_factory) -> Path:
    """The "after" model: the built-in one unlearned for one step by the CLI."""
    out = tmp_path_factory.mktemp("after") / "no-tshirt"
    assert main(["unlearn", "--model", "builtin", "--steps", "1", "--batch", "4", "--device", "cpu",
                 "--out", str(out)]) == 0
    return out


def distances(note: str) -> dict[str, float]:
    return {name: float(value) for name, value in re.findall(r"(before|after|oracle) (\d+\.\d)", note)}


def test_renoise_endpoint_before_after_and_oracle(client, unlearned):
    picture, note = client.predict(str(MODEL), "", "", [], str(unlearned), 500, 0, api_name="/renoise")
    assert Image.open(picture).size[0] == 5 * (3 * 28 + 2) + 2  # image, noised, before, after, oracle: 28 px tiles x 3
    assert "t = 500" in note and set(distances(note)) == {"before", "after", "oracle"}, note
    # The built-in model memorised the T-shirt: from t = 500 it brings it back, the oracle does not.
    assert distances(note)["before"] < distances(note)["oracle"] / 2, note

    _, note = client.predict(str(MODEL), "", "", [], str(unlearned), 0, 0, api_name="/renoise")
    assert distances(note) == {"before": 0.0, "after": 0.0, "oracle": 0.0}  # t = 0: no noise to undo
    _, note = client.predict(str(MODEL), "", "", [], "", 510, 0, api_name="/renoise")
    assert "t = 500" in note and set(distances(note)) == {"before", "oracle"}  # no "after" model yet

    with pytest.raises(Exception, match="not a model folder"):
        client.predict(str(MODEL), "", "", [], "/no/such/model", 500, 0, api_name="/renoise")


def test_likelihood_endpoint_streams_a_table_of_bits_per_dim(client, unlearned):
    job = client.submit(str(MODEL), "", "", [], str(unlearned), api_name="/likelihood")
    updates = [update for update in job]  # one per model
    table = updates[-1]
    assert len(updates) == 3, updates
    header, _, forget_row, retain_row = table.splitlines()[:4]
    assert header == "| image | before | after | oracle |"
    assert "t-shirt" in forget_row and "(forget)" in forget_row and "(retain)" in retain_row
    assert len(re.findall(r"\d+\.\d{3} ± \d+\.\d{3}", forget_row + retain_row)) == 6
    assert "s per image" in table
