from PIL import Image

from genfast.cli import main


def test_generate_writes_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["generate", "--prompt", "a red circle", "--prompt", "a blue square",
                 "--steps", "3", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 64


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["generate", "--pipeline", str(tmp_path / "nope"), "--steps", "2"]) == 2
    assert "model_index.json" in capsys.readouterr().err
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    assert main(["generate", "--prompts-file", str(empty)]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_bad_numbers_are_refused(capsys):
    import pytest

    with pytest.raises(SystemExit) as err:
        main(["generate", "--steps", "0"])
    assert err.value.code == 2 and "--steps must be > 0" in capsys.readouterr().err
