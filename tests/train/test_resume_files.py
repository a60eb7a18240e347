"""A malformed checkpoint pointer (OUT/checkpoints/latest.json) is a TrainConfigError naming it and what to do."""
from __future__ import annotations

import pytest

from glimr.train.trainer import TrainConfigError, latest_checkpoint


@pytest.mark.parametrize(("content", "what"), [
    (b"{not json", "not a checkpoint pointer (JSONDecodeError"),
    (b"\xff\xfe", "not a checkpoint pointer (UnicodeDecodeError"),
    (b"[1, 2]", "not a checkpoint pointer (TypeError"),
    (b'{"step": 3}', "not a checkpoint pointer (KeyError"),
    (b'{"dir": 7}', "'dir' must name a folder"),
    (b'{"dir": "../../elsewhere"}', "'dir' must name a folder"),
    (b'{"dir": ".."}', "'dir' must name a folder"),
])
def test_a_malformed_pointer_names_the_file(tmp_path, content, what):
    ck = tmp_path / "checkpoints"
    (ck / "step-4").mkdir(parents=True)
    (ck / "latest.json").write_bytes(b'{"dir": "step-4", "step": 4}')
    assert latest_checkpoint(tmp_path) == ck / "step-4"
    (ck / "latest.json").write_bytes(content)
    with pytest.raises(TrainConfigError) as e:
        latest_checkpoint(tmp_path)
    assert what in str(e.value) and str(ck / "latest.json") in str(e.value) and "--resume-from" in str(e.value)


def test_no_pointer_or_a_missing_folder_is_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text('{"dir": "step-9"}')
    assert latest_checkpoint(tmp_path) is None
