"""What every recipe is: a config class, a trainer Task, and what the command line does with a finished run.

A recipe is one unit (``mmx/recipes/<name>/``): it trains through :func:`mmx.train.train` with its
Task, rebuilds a run folder with :meth:`Recipe.load`, and scores and maps it with
:meth:`Recipe.evaluate` and :meth:`Recipe.attend`, each of which returns a :class:`Result` that
``mmx eval`` / ``mmx attend`` print and save. Nothing outside a recipe branches on its name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmx.attnmap.plot import file_label

__all__ = ["Recipe", "Result", "Run", "RecipeError", "check_steps", "file_label", "format_score"]


class RecipeError(ValueError):
    """A request a recipe cannot serve (an option it has no use for, a run it cannot read); the message says why."""


@dataclass
class Run:
    """A finished run folder, rebuilt: its recipe, its checked config and what it trained.

    ``model`` is what the recipe works with: a :class:`~mmx.diffusion.TextToImage` pipeline, a
    :class:`~mmx.diffusion.DiffusionPolicy`, a seq2seq task (model and tokenizers), a grounding
    model with its text encoder.
    """

    path: Path
    recipe: Recipe
    config: Any
    model: Any

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class Result:
    """What a command produced: lines for the user, a JSON report and pictures to write.

    ``pictures`` maps a file name to a function that writes that file (given its path), so a result
    can be inspected without touching the disk and saved where the caller says.
    """

    lines: list[str]
    report: dict[str, Any] = field(default_factory=dict)
    report_name: str | None = None  # e.g. "eval.json"; None: no JSON file
    pictures: dict[str, Callable[[Path], Any]] = field(default_factory=dict)

    def save(self, folder: Path) -> list[Path]:
        """Write the pictures and the report into ``folder`` (created); returns the paths written."""
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, draw in self.pictures.items():
            draw(folder / name)
            written.append(folder / name)
        if self.report_name is not None:
            path = folder / self.report_name
            path.write_text(json.dumps(self.report, indent=1, ensure_ascii=False, default=str))
            written.append(path)
        return written

    def summary(self) -> str:
        return "\n".join(self.lines)


class Recipe:
    """One kind of run: subclasses set the class attributes and implement ``load``, ``evaluate`` and ``attend``.

    Options that a command offers but a recipe has no use for are refused by name (see
    :meth:`options`), never silently ignored.
    """

    name: str = ""
    config_class: type
    task_class: type
    model_folder: str = "model"  # inside a run folder: present once training finished

    def load(self, path: Path, overrides: list[str] | None = None, device: str = "cpu") -> Run:
        """Rebuild a finished run folder; ``overrides`` are ``key=value`` changes to its config."""
        raise NotImplementedError

    def evaluate(self, run: Run, **options: Any) -> Result:
        """Score a finished run on its held-out data (the returned result holds ``eval.json``)."""
        raise NotImplementedError

    def attend(self, run: Run, **options: Any) -> Result:
        """Which region, step or word each output looked at: overlays and statistics."""
        raise NotImplementedError

    def sample(self, run: Run, **options: Any) -> Result:
        """Generate from prompts (recipes that generate images)."""
        raise RecipeError(f"{run.path} is a {self.name} run; `mmx sample` generates images with text-to-image runs")

    def demo(self, run: Run, **options: Any) -> Result:
        """The shipped model's demonstration (recipes that ship one)."""
        raise RecipeError(f"the {self.name} recipe has no demo")

    @staticmethod
    def options(method: Callable[..., Result], given: dict[str, Any]) -> dict[str, Any]:
        """``given`` (None values dropped), checked against the keyword arguments ``method`` takes."""
        import inspect

        accepted = set(inspect.signature(method).parameters) - {"run"}
        given = {k: v for k, v in given.items() if v is not None and v is not False}
        unknown = sorted(set(given) - accepted)
        if unknown:
            owner = getattr(method, "__self__", None)
            who = getattr(owner, "name", "this")
            raise RecipeError(
                f"{', '.join('--' + k.replace('_', '-') for k in unknown)} do(es) not apply to {who} "
                f"runs; they take: {', '.join('--' + k.replace('_', '-') for k in sorted(accepted))}"
            )
        return given


def format_score(value: float) -> str:
    """A score for a person: three decimals, or why there is none (NaN: nothing to score)."""
    return "n/a (no object found)" if value != value else f"{value:.3f}"


def check_steps(steps: int | None, scheduler: Any) -> None:
    """``--steps`` must fit the run's noise schedule (1 .. its training timesteps); the error names the value."""
    if steps is None:
        return
    from mmx.diffusion.sampling import check_steps as check

    try:
        check(steps, scheduler)
    except ValueError as err:
        raise RecipeError(f"--steps {steps}: {err}") from None
