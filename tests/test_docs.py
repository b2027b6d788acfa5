"""The documentation (README.md, docs/*.md, figure/README.md) cannot silently rot.

* every relative link and ``#anchor`` resolves (anchors as GitHub makes them from headings);
* every repository path it names (``tool/...``, ``config/...``, ``util/...``, ...) exists, placeholders such
  as ``config/DATASET/DATASET_EXP.yaml`` matching at least one file, ``{a,b}`` alternatives each;
* every dotted ``util.X.name`` / ``model.X.name`` it names in backquotes can be imported;
* every command it shows for the project's scripts is accepted: ``--flags`` by the script's own argparse
  parser (captured from its ``main``), ``KEY VALUE`` overrides by the config schema (util/config.py, plus the
  keys the docs' own example files declare with ``register_keys``), ``DATASET EXP`` of the wrappers by an
  existing ``config/DATASET/DATASET_EXP.yaml``.

Each failure names the file, the line and the broken thing. :func:`doc_section` is how the tests that run
the docs' examples find them (it fails, never skips, when the text is gone).
"""
from __future__ import annotations

import argparse
import glob
import importlib
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from tiny_runs import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([REPO_ROOT / "README.md", REPO_ROOT / "figure" / "README.md",
                    *(REPO_ROOT / "docs").glob("*.md")])
# The pages the README's index promises; a missing one fails here rather than as a dead link only.
MANUAL_PAGES = ("installation", "datasets", "training", "testing", "model_zoo", "deployment", "performance",
                "faults", "extending", "development")

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*$")
PLACEHOLDER_IN_PATH = re.compile(r"(?<![a-z0-9])[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*(?![a-z0-9])")
SCRIPT_PATH = re.compile(r"(?:^|/)((?:tool|figure)/[\w/.-]+\.(?:py|sh))$")
# Repository paths named in the text. tool/ and config/ are also recognised after a folder
# (~/pyconvsegnet/tool/train.sh, $REPO/tool/...); the other top-level folders only on their own, since
# "model/" also ends run folders such as exp/demo/EXP/model/.
REPO_PATH = re.compile(
    r"(?:(?<=/)|(?<![\w.~$/-]))((?:tool|config)/[\w.{},*/-]*)"
    r"|(?<![\w.~$/-])((?:util|model|tests|figure|docs|\.ci)/[\w.{},*/-]*)")
DOTTED = re.compile(r"^(?:util|model)(?:\.\w+)+$")
# Files the docs ask the reader to create (docs/extending.md's example backbone), not files of the repository.
FILES_TO_CREATE = {"model/simplenet.py"}
URL = re.compile(r"\b(?:https?|ftp)://[^\s)>`]+")


@dataclass
class Line:
    path: Path
    number: int
    text: str
    fence: Optional[str]  # the code block's language ("" for none), None outside code blocks

    def where(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.number}"


def doc_lines(path: Path) -> List[Line]:
    lines, fence, marker = [], None, None
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(text)
        if match and fence is None:
            fence, marker = match.group(3).strip().lower(), match.group(2)
            continue
        if match and fence is not None and match.group(2).startswith(marker) and not match.group(3).strip():
            fence = marker = None
            continue
        lines.append(Line(path, number, text, fence))
    return lines


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: markup and punctuation dropped, lower case, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    found, seen = set(), {}
    for line in doc_lines(path):
        match = HEADING.match(line.text) if line.fence is None else None
        if match:
            anchor = github_anchor(match.group(2))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def prose(text: str) -> str:
    """The line without its inline code spans (links inside backquotes are not links)."""
    return INLINE_CODE.sub("", text)


# ---------------------------------------------------------------------------------------------
# (a) links and anchors


def test_manual_pages_exist():
    missing = [name for name in MANUAL_PAGES if not (REPO_ROOT / "docs" / f"{name}.md").is_file()]
    assert not missing, f"docs/ lacks the pages {missing}"


def text_lines() -> Iterator[Line]:
    """The lines of every documentation file outside code blocks."""
    for path in DOC_FILES:
        yield from (line for line in doc_lines(path) if line.fence is None)


def test_relative_links_and_anchors_resolve():
    problems = []
    for line in text_lines():
        for target in LINK.findall(prose(line.text)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (line.path.parent / file_part).resolve() if file_part else line.path
            if not linked.exists():
                problems.append(f"{line.where()}: link target {file_part} does not exist")
                continue
            if REPO_ROOT not in linked.parents and linked != REPO_ROOT:
                problems.append(f"{line.where()}: link {target} leaves the repository")
                continue
            if anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{line.where()}: anchor #{anchor} is not a heading of "
                                f"{linked.relative_to(REPO_ROOT)}")
    assert not problems, "\n".join(problems)


def test_github_anchor_rule():
    assert github_anchor("On a GPU machine: `tool/gpu_check.sh`") == "on-a-gpu-machine-toolgpu_checksh"
    assert github_anchor("The release's checkpoints") == "the-releases-checkpoints"
    assert github_anchor("Multi-GPU, multi-node, multi-process CPU") == "multi-gpu-multi-node-multi-process-cpu"


# ---------------------------------------------------------------------------------------------
# (b) repository paths


def expand_braces(text: str) -> List[str]:
    match = re.search(r"\{([^{}]*)\}", text)
    if not match:
        return [text]
    return [expanded for option in match.group(1).split(",")
            for expanded in expand_braces(text[:match.start()] + option + text[match.end():])]


def path_exists(mention: str) -> bool:
    """A mention with placeholders (DATASET, EXP, NAME) or ``*`` needs at least one matching file."""
    for candidate in expand_braces(mention):
        pattern = PLACEHOLDER_IN_PATH.sub("*", candidate)
        if "*" in pattern:
            if not glob.glob(str(REPO_ROOT / pattern)):
                return False
        elif not (REPO_ROOT / candidate).exists():
            return False
    return True


def repository_paths(text: str) -> Iterator[str]:
    for match in REPO_PATH.finditer(URL.sub("", text)):
        mention = (match.group(1) or match.group(2)).rstrip(".,:;")
        if mention.count("{") == mention.count("}"):
            yield mention


def test_named_repository_paths_exist():
    problems = []
    for path in DOC_FILES:
        for line in doc_lines(path):
            for mention in repository_paths(line.text):
                if mention not in FILES_TO_CREATE and not path_exists(mention):
                    problems.append(f"{line.where()}: {mention} does not exist in the repository")
    assert not problems, "\n".join(problems)


def test_path_mentions_are_found_and_placeholders_matched():
    text = "see config/DATASET/DATASET_EXP.yaml, ~/pyconvsegnet/tool/train.sh and exp/demo/x/model/y.pth"
    assert list(repository_paths(text)) == ["config/DATASET/DATASET_EXP.yaml", "tool/train.sh"]
    assert path_exists("config/DATASET/DATASET_EXP.yaml")
    assert path_exists("tool/dataset_converters/prepare_{ade20k,cityscapes,voc}.py")
    assert not path_exists("tool/dataset_converters/prepare_{ade20k,nothing}.py")
    assert not path_exists("config/DATASET/DATASET_nothing.yaml")


# ---------------------------------------------------------------------------------------------
# (b') dotted Python names


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_dotted_python_names_resolve():
    problems = []
    for line in text_lines():
        for _, code in INLINE_CODE.findall(line.text):
            name = code.strip().split("(")[0]
            if DOTTED.match(name) and not any(PLACEHOLDER.match(part) for part in name.split(".")) \
                    and not resolves(name):
                problems.append(f"{line.where()}: {name} cannot be imported")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# (c) commands: flags of the scripts' parsers, config keys of the overrides


@dataclass
class Command:
    line: Line
    tokens: List[str]
    inline: bool = False  # from a code span in the text, where `python tool/train.py` alone names the script


SHELL_BLOCKS = {"bash", "sh", "shell", "console"}


def shell_commands(path: Path) -> Iterator[Command]:
    """Commands of shell code blocks (every line), of text blocks (``$ `` lines) and of inline code spans
    that start with a program, continuation lines joined, heredoc bodies left out."""
    lines = doc_lines(path)
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if line.fence is None:
            for _, code in INLINE_CODE.findall(line.text):
                if re.match(r"^(?:\S+=\S+\s+)*(?:python3?|torchrun|sh|bash|\./tool/)\b", code.strip()):
                    yield from split_commands(line, code, inline=True)
            continue
        text = line.text
        if line.fence in SHELL_BLOCKS:
            pass
        elif line.fence == "text" and text.startswith("$ "):
            text = text[2:]
            if shows_an_error(lines, index):
                continue
        else:
            continue
        start = line
        while text.rstrip().endswith("\\") and index < len(lines) and lines[index].fence == start.fence:
            text = text.rstrip()[:-1] + " " + lines[index].text.strip()
            index += 1
        heredoc = re.search(r"<<-?\s*'?\"?(\w+)", text)
        if heredoc:
            while index < len(lines) and lines[index].text.strip() != heredoc.group(1):
                index += 1
            index += 1
            text = text[:heredoc.start()]
        yield from split_commands(start, text)


def shows_an_error(lines: List[Line], index: int) -> bool:
    """A transcript command whose output (the lines after it and its continuation lines) starts with the
    tools' one-line errors: it is shown failing on purpose."""
    while index < len(lines) and lines[index - 1].text.rstrip().endswith("\\"):
        index += 1
    return index < len(lines) and lines[index].text.startswith(("config error:", "usage:", "error:"))


def split_commands(line: Line, text: str, inline: bool = False) -> Iterator[Command]:
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
    except ValueError as exc:
        raise AssertionError(f"{line.where()}: cannot read the command {text!r}: {exc}") from None
    current: List[str] = []
    for token in tokens + [";"]:
        if token and set(token) <= set(";&|"):
            if current:
                yield Command(line, current, inline)
            current = []
        else:
            current.append(token)


def script_of(tokens: List[str]) -> Tuple[Optional[str], List[str]]:
    """(the project script a command runs, its arguments), or (None, []) for any other program."""
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
        tokens = tokens[1:]  # environment assignments
    if not tokens:
        return None, []
    program, rest = tokens[0], tokens[1:]
    if program in ("python", "python3", "torchrun", "sh", "bash") or re.search(r"(?:^|/)python3?$", program):
        for position, token in enumerate(rest):
            match = SCRIPT_PATH.search(token)
            if match:
                return match.group(1), rest[position + 1:]
            if program in ("python", "python3") and token == "-m":
                return None, []
        return None, []
    match = SCRIPT_PATH.search(program)
    return (match.group(1), rest) if match else (None, [])


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser, known: bool):
        super().__init__("parser captured")
        self.parser, self.known = parser, known


_PARSERS: Dict[str, Tuple[argparse.ArgumentParser, bool]] = {}


def script_parser(script: str, monkeypatch) -> Tuple[argparse.ArgumentParser, bool]:
    """The argparse parser ``script``'s main() builds, and whether it keeps unknown arguments
    (parse_known_args: they are KEY VALUE overrides)."""
    if script not in _PARSERS:
        def capture_all(self, *args, **kwargs):
            raise _Captured(self, False)

        def capture_known(self, *args, **kwargs):
            raise _Captured(self, True)

        module = load_script(script, "docs_" + re.sub(r"\W", "_", script))
        with monkeypatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "parse_args", capture_all)
            patch.setattr(argparse.ArgumentParser, "parse_known_args", capture_known)
            try:
                module.main([])
            except _Captured as captured:
                _PARSERS[script] = (captured.parser, captured.known)
            else:
                raise AssertionError(f"{script}: main() returned without parsing a command line")
    return _PARSERS[script]


def config_keys() -> set:
    """The schema's keys, and those the docs' example files declare (``register_keys`` in their code)."""
    from util.config import defaults

    keys = set(defaults())
    for path in DOC_FILES:
        for block in re.findall(r"register_keys\(\s*\"\w+\"\s*,\s*\{([^}]*)\}", path.read_text(encoding="utf-8")):
            keys.update(re.findall(r"\"(\w+)\"\s*:", block))
    return keys


def clean_arguments(arguments: List[str]) -> Tuple[List[str], bool]:
    """Optional groups ``[--seed 0]`` unbracketed, and everything from an elision ``...`` on left out (what
    it stands for is unknown). Returns the arguments and whether some were elided."""
    cleaned = []
    for token in arguments:
        if token in ("...", "…"):
            return cleaned, True
        bracketed = token
        if token.startswith("[") and "]" not in token:
            token = token[1:]
        if token.endswith("]") and "[" not in token:
            token = token[:-1]
        if token or bracketed == token:  # an argument '' stays; a lone bracket goes
            cleaned.append(token)
    return cleaned, False


def with_values(arguments: List[str]) -> List[str]:
    """Placeholders (``N``, ``IMAGES``) given a value every argparse type accepts; ``KEY VALUE`` stays."""
    return ["1" if PLACEHOLDER.match(token) and token not in ("KEY", "VALUE") else token for token in arguments]


def override_problems(pairs: List[str], keys: set) -> List[str]:
    if len(pairs) % 2:
        return [f"KEY VALUE overrides of odd length: {pairs}"]
    problems = []
    for key in pairs[0::2]:
        if key == "KEY":
            continue
        if key.lstrip("-") not in keys:
            kind = "option" if key.startswith("-") else "config key"
            problems.append(f"{kind} {key!r} is neither the script's option nor a config key (util/config.py)")
    return problems


def command_problems(script: str, arguments: List[str], monkeypatch, keys: set) -> List[str]:
    arguments, elided = clean_arguments(arguments)
    name = Path(script).name
    if name in ("train.sh", "test.sh", "slurm_train.sh", "slurm_test.sh"):
        leading = 4 if name.startswith("slurm") else 2
        if len(arguments) < leading:
            # `sh tool/train.sh` alone names the script; `./tool/train.sh ...` elides its arguments
            return [] if elided or not arguments else [
                f"{script} needs {'PARTITION JOB_NAME ' if leading == 4 else ''}DATASET EXP, got {arguments}"]
        dataset, exp = arguments[leading - 2:leading]
        config = f"config/{dataset}/{dataset}_{exp}.yaml"
        problems = [] if path_exists(config) else [f"{script} {dataset} {exp}: {config} does not exist"]
        pairs = arguments[leading:]
        pairs = pairs[:len(pairs) - len(pairs) % 2] if elided else pairs
        return problems + [f"{script}: {problem}" for problem in override_problems(pairs, keys)]
    if name in ("quickstart.sh", "gpu_check.sh"):
        return [f"{script} takes no arguments, got {arguments}"] if arguments else []
    if script.endswith(".sh"):
        return [f"{script}: no rule for this shell script in tests/test_docs.py"]

    parser, known = script_parser(script, monkeypatch)
    options = {option for action in parser._actions for option in action.option_strings}
    if elided:  # an incomplete command: its flags at least must be the parser's
        return [f"{script}: option {token} is not one of its parser's options"
                for token in arguments if token.startswith("--") and token.split("=")[0] not in options]

    def refuse(message):
        raise ValueError(message)

    with monkeypatch.context() as patch:
        patch.setattr(parser, "error", refuse)
        patch.setattr(parser, "exit", lambda status=0, message=None: refuse(message or f"exit {status}"))
        try:
            valued = with_values(arguments)
            args, extras = parser.parse_known_args(valued) if known else (parser.parse_args(valued), [])
        except ValueError as exc:
            return [f"{script} refuses {arguments}: {exc}"]
    overrides = list(getattr(args, "opts", None) or []) + list(extras)
    problems = [f"{script}: option {token} is not one of its parser's options (abbreviated?)"
                for token in arguments if token.startswith("--") and token not in overrides
                and token.split("=")[0] not in options]
    if "--config" in options:
        problems += [f"{script}: {problem}" for problem in override_problems(overrides, keys)]
    elif overrides:
        problems.append(f"{script} takes no KEY VALUE overrides, got {overrides}")
    return problems


def test_shown_commands_are_accepted(monkeypatch):
    keys = config_keys()
    problems, checked = [], 0
    for path in DOC_FILES:
        for command in shell_commands(path):
            script, arguments = script_of(command.tokens)
            if script is None or (command.inline and not arguments):
                continue
            checked += 1
            problems += [f"{command.line.where()}: {problem}"
                         for problem in command_problems(script, arguments, monkeypatch, keys)]
    assert checked >= 30, f"only {checked} commands of the project's scripts found in the docs"
    assert not problems, "\n".join(problems)


def test_broken_commands_are_caught(monkeypatch):
    """The checker itself: a mistyped flag, a mistyped key, an unknown config and a wrong argument count."""
    keys = config_keys()
    assert command_problems("tool/train.sh", ["camvid", "pyconvresnet50_pyconvsegnet", "epochs", "2"],
                            monkeypatch, keys) == []
    assert command_problems("tool/train.sh", ["camvid", "pyconvresnet50_pyconvsegnet", "epoch", "2"],
                            monkeypatch, keys)
    assert command_problems("tool/test.sh", ["camvid", "no_such_exp"], monkeypatch, keys)
    assert command_problems("tool/train.sh", ["camvid", "pyconvresnet50_pyconvsegnet", "epochs"], monkeypatch, keys)
    export = ["--config", "config/demo/demo_pyconvresnet50_pyconvsegnet.yaml", "--format", "onnx"]
    assert command_problems("tool/deployment/export.py", export + ["--output", "x.onnx"], monkeypatch, keys) == []
    assert command_problems("tool/deployment/export.py", export + ["--outptu", "x.onnx"], monkeypatch, keys)
    assert command_problems("tool/dataset_converters/make_lists.py", ["IMAGES", "LABELS", "OUT", "--classes", "N",
                                                                     "[--seed", "0]"], monkeypatch, keys) == []
    assert command_problems("tool/dataset_converters/make_lists.py", ["a", "b", "c", "--class", "3"],
                            monkeypatch, keys)
    assert command_problems("tool/demo.py", ["--config", "c.yaml", "--output", "x"], monkeypatch, keys)  # --image
    assert command_problems("tool/quickstart.sh", ["now"], monkeypatch, keys)


# ---------------------------------------------------------------------------------------------
# The docs' examples, for the tests that run them


def doc_section(page: str, heading: str) -> str:
    """The text under ``heading`` (any level) of ``page`` (relative to the repository), up to the next
    heading of the same or a higher level. Fails, naming page and heading, when either is gone."""
    path = REPO_ROOT / page
    assert path.is_file(), f"{page} does not exist (it holds the section '{heading}')"
    lines = path.read_text(encoding="utf-8").splitlines()
    in_code, start, level = False, None, None
    for number, text in enumerate(lines):
        if FENCE.match(text):
            in_code = not in_code
            continue
        match = None if in_code else HEADING.match(text)
        if match and start is None and match.group(2) == heading:
            start, level = number + 1, len(match.group(1))
        elif match and start is not None and len(match.group(1)) <= level:
            return "\n".join(lines[start:number])
    if start is None:
        pytest.fail(f"{page} has no section '{heading}'")
    return "\n".join(lines[start:])


def python_example(page: str, heading: str) -> str:
    """The first ```python block of a section (see :func:`doc_section`)."""
    blocks = re.findall(r"```python\n(.*?)```", doc_section(page, heading), flags=re.S)
    if not blocks:
        pytest.fail(f"{page}, section '{heading}', has no python example")
    return blocks[0]
