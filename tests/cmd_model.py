"""A small model of cmd.exe, enough to run the project's .bat files on Linux and to fail where
cmd would. No Windows here: the scripts are executed against this model, every branch an
outside program can choose (an exit code, a file that exists or not) explored.

Phase 1, the percent expansion, follows the rules measured by jeb and dbenham ("How does the
Windows Command Interpreter (CMD.EXE) parse scripts?", https://stackoverflow.com/a/4095133),
batch mode with extensions on:
- `%%` is `%`; `%*`, `%1`, `%~1`, `%~dp0` are the arguments;
- `%VAR%`: the value, or nothing when VAR is undefined;
- `%VAR:~m,n%` (substring) and `%VAR:a=b%` (substitution): when VAR is undefined, cmd removes
  `%VAR:` and goes on scanning, so the rest of the line is read as other variables, and a
  line like `if "%ACCOUNT:~0,2%"==".\\" ...` becomes `if "~0,2COMPUTERNAMEACCOUNT:~2"`, which
  no longer parses. In `strict` mode (the default) that case is an error of its own
  (UndefinedEdit): an edit of an undefined variable is a bug even where the mangled line
  still happens to parse. A guard on the same line (`if defined VAR ... %VAR:~1%`) does not
  help: the whole line is expanded before the `if` is evaluated;
- a `%` without a closing one is dropped.
Then the model checks what cmd's later phases would trip on: an unquoted `&`, `|`, `<`, `>`
in an expanded line (apart from `>nul`, `2>nul` and `|| goto`), an `if` that does not parse.
Whatever the project's scripts do not use (blocks, `call`, `set /p`...) is refused with
BatchModelError rather than guessed."""
from __future__ import annotations

import ntpath
import re
from dataclasses import dataclass, field


class BatchModelError(Exception):
    """The script does something this model does not know; extend the model, do not guess."""


class BatchSyntaxError(Exception):
    """cmd stops the script here ("A sintaxe do comando está incorreta.")."""


class UndefinedEdit(BatchSyntaxError):
    """A substring or substitution of a variable that is not defined at that point."""


# ------------------------------------------------------------------ phase 1: percent expansion
def expand(line: str, env: dict, args: list[str], *, dynamic: dict | None = None,
           strict: bool = True) -> str:
    """`line` after cmd's percent expansion. `env`: variables (names in upper case);
    `args`: %0 (the script's full path), %1, %2...; `dynamic`: ERRORLEVEL, CD and the like,
    seen only when no variable of that name exists."""
    values = {**{k.upper(): v for k, v in (dynamic or {}).items()}, **env}
    out, i = [], 0
    while i < len(line):
        percent = line.find("%", i)
        if percent < 0:
            out.append(line[i:])
            break
        out.append(line[i:percent])
        i = percent
        following = line[i + 1:i + 2]
        if following == "%":
            out.append("%")
            i += 2
        elif following == "*":
            out.append(" ".join(args[1:]))
            i += 2
        elif following.isdigit():
            out.append(_arg(args, int(following)))
            i += 2
        elif following == "~":
            match = re.match(r"~([fdpnx]*)(\d)", line[i + 1:], re.I)
            if not match:
                raise BatchSyntaxError(f"uso inválido de %~ em: {line}")
            out.append(_modified(_arg(args, int(match[2])), match[1].lower()))
            i += 1 + match.end()
        else:
            i = _expand_variable(line, i, values, out, strict)
    return "".join(out)


def _expand_variable(line, i, values, out, strict) -> int:
    """One `%...` that is not an argument; returns where the scan goes on."""
    end = i + 1
    while end < len(line) and line[end] not in "%:":
        end += 1
    if end >= len(line):                                   # no closing %: the % is dropped
        return i + 1
    name = line[i + 1:end]
    if line[end] == ":" and line[end + 1:end + 2] == "%":  # %VAR:% is a name ending in ':'
        name, end = name + ":", end + 1
    if line[end] == "%":
        out.append(values.get(name.upper(), ""))
        return end + 1
    if name.upper() not in values:                         # %VAR: of an undefined VAR
        if strict:
            raise UndefinedEdit(f"%{name}:...% com {name} indefinida em: {line}")
        return end + 1                                     # cmd drops "%VAR:" and goes on
    value, rest = values[name.upper()], line[end + 1:]
    substring = re.match(r"~(-?\d+)?(?:,(-?\d+))?%", rest)
    if substring:
        out.append(_substring(value, substring[1], substring[2]))
        return end + 1 + substring.end()
    if rest.startswith(("=", "*=")):
        raise BatchSyntaxError(f"substituição sem texto a procurar em: {line}")
    replace = re.match(r"(\*?)([^=%]+)=([^%]*)%", rest)
    if replace:
        out.append(_replaced(value, *replace.groups()))
        return end + 1 + replace.end()
    return i + 1                                           # not an edit: the % is dropped


def _arg(args, n) -> str:
    return args[n] if n < len(args) else ""


def _modified(arg: str, modifiers: str) -> str:
    path = arg.strip('"')
    if not modifiers:
        return path
    full = ntpath.normpath(path)
    drive, rest = ntpath.splitdrive(full)
    folder, name = ntpath.split(rest)
    stem, extension = ntpath.splitext(name)
    if "f" in modifiers:
        return full
    parts = {"d": drive, "p": folder.rstrip("\\") + "\\", "n": stem, "x": extension}
    return "".join(parts[m] for m in "dpnx" if m in modifiers)


def _substring(value: str, offset: str | None, length: str | None) -> str:
    start = int(offset or 0)
    text = value[max(len(value) + start, 0):] if start < 0 else value[start:]
    if length is None:
        return text
    count = int(length)
    return text[:count] if count >= 0 else text[:max(len(text) + count, 0)]


def _replaced(value: str, star: str, search: str, replacement: str) -> str:
    if star:
        at = value.lower().find(search.lower())
        return value if at < 0 else replacement + value[at + len(search):]
    return re.sub(re.escape(search), lambda _: replacement, value, flags=re.I)


# ------------------------------------------------------------------ later phases, one line
_SPECIAL = re.compile(r'["^|&<>]')


def split_line(text: str) -> tuple[str, str | None]:
    """The command (carets removed, `>nul`/`2>nul` dropped) and the label of a trailing
    `|| goto label`. Raises BatchSyntaxError for an unquoted `&`, `|`, `<` or `>` otherwise:
    the expanded line would run as something else than written."""
    out, quoted, i, on_failure = [], False, 0, None
    while i < len(text):
        special = _SPECIAL.search(text, i)
        if special is None:
            out.append(text[i:])
            break
        out.append(text[i:special.start()])
        i = special.start()
        char = text[i]
        if char == '"':
            quoted = not quoted
        elif not quoted and char == "^":
            i += 1
            out.append(text[i:i + 1])
            i += 1
            continue
        elif not quoted and text.startswith("||", i):
            match = re.fullmatch(r"\|\|\s*goto\s+(\S+)\s*", text[i:], re.I)
            if not match:
                raise BatchModelError(f"'||' sem 'goto rótulo' em: {text}")
            on_failure = match[1]
            break
        elif not quoted and char == ">":
            match = re.match(r"\s*nul\b", text[i + 1:], re.I)
            if not match:
                raise BatchSyntaxError(f"redirecionamento inesperado (>) em: {text}")
            if out and out[-1] in "12":
                out.pop()
            i += 1 + match.end()
            continue
        elif not quoted and char in "&|<":
            raise BatchSyntaxError(f"caractere especial sem aspas ({char}) em: {text}")
        out.append(char)
        i += 1
    return "".join(out).strip(), on_failure


def windows_argv(text: str) -> list[str]:
    """Split a command line as a Windows program's C runtime does (quotes group, and go)."""
    argv, current, quoted, started = [], [], False, False
    for char in text:
        if char == '"':
            quoted, started = not quoted, True
        elif char in " \t" and not quoted:
            if started:
                argv.append("".join(current))
            current, started = [], False
        else:
            current.append(char)
            started = True
    if started:
        argv.append("".join(current))
    return argv


_IF = re.compile(r"if\s+(/i\s+)?(not\s+)?(.*)$", re.I | re.S)
_OPERAND = r'("[^"]*"|[^\s="]+)'
_COMPARE = re.compile(_OPERAND + r"\s*==\s*" + _OPERAND + r"\s+(\S.*)$", re.S)


# ------------------------------------------------------------------ running a script
@dataclass
class Run:
    """One path through a script: how it ended, what it ran, what it printed."""
    code: int
    exited: bool                       # by `exit /b`, not by falling off the end
    commands: list[list[str]] = field(default_factory=list)
    output: list[str] = field(default_factory=list)
    choices: list[bool] = field(default_factory=list)


class _Choices:
    """The outside world's answers along one path: given ones first, then the default
    (the program succeeds, the file exists); every answer taken is recorded."""

    def __init__(self, given: list[bool]):
        self.given, self.taken = given, []

    def next(self) -> bool:
        answer = self.given[len(self.taken)] if len(self.taken) < len(self.given) else True
        self.taken.append(answer)
        return answer


class _Batch:
    def __init__(self, lines, args, env, choices, strict):
        self.lines, self.args, self.choices, self.strict = lines, args, choices, strict
        self.env = {k.upper(): v for k, v in env.items()}
        self.errorlevel, self.cwd = 0, "C:\\Windows\\System32"
        self.run = Run(0, False)
        self.labels = {}
        for number, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith(":") and not stripped.startswith("::"):
                self.labels.setdefault(stripped[1:].split()[0].lower(), number)

    def execute(self) -> Run:
        pc, steps = 0, 0
        while pc < len(self.lines):
            steps += 1
            if steps > 10_000:
                raise BatchModelError("laço sem fim")
            line, pc = self.lines[pc], pc + 1
            text = expand(line, self.env, self.args, strict=self.strict,
                          dynamic={"ERRORLEVEL": str(self.errorlevel), "CD": self.cwd}).strip()
            checks_errorlevel = pc < len(self.lines) and re.match(
                r"\s*if\s+(not\s+)?errorlevel\b", self.lines[pc], re.I) is not None
            jump = self.command(text.lstrip("@"), checks_errorlevel)
            if jump is None:
                continue
            kind, target = jump
            if kind == "exit":
                self.run.code, self.run.exited = target, True
                return self.run
            if target.lower() in (":eof", "eof"):
                break
            if target.lower().lstrip(":") not in self.labels:
                raise BatchSyntaxError(f"rótulo inexistente: {target}")
            pc = self.labels[target.lower().lstrip(":")] + 1
        self.run.code = self.errorlevel
        return self.run

    def command(self, text: str, checks_errorlevel: bool = False):
        """Run one expanded command; returns ("goto", label), ("exit", code) or None."""
        word = text.split(None, 1)[0].lower() if text else ""
        if word == "rem":                       # expanded above (phase 1), as cmd does; and
            split_line(text)                    # no & | < > in it (command.com ran those)
            return None
        if not text or word in ("setlocal", "endlocal") or text.startswith(":"):
            return None
        if word == "for":
            return self.for_loop(text)
        if word == "if":
            return self.if_command(text)
        command, on_failure = split_line(text)
        word = command.split(None, 1)[0].lower()
        if word in ("echo", "echo."):
            if command.lower() not in ("echo off", "echo on"):
                self.run.output.append(command[5:])
            return None
        if word == "goto":
            return ("goto", command.split()[1])
        if word == "exit":
            match = re.fullmatch(r"exit\s+/b\s+(\d+)", command, re.I)
            if not match:
                raise BatchModelError(f"exit não modelado: {command}")
            return ("exit", int(match[1]))
        if word == "set":
            return self.set_command(command)
        if word == "cd":
            match = re.fullmatch(r'cd\s+/d\s+"([^"]+)"', command, re.I)
            if not match:
                raise BatchModelError(f"cd não modelado: {command}")
            self.cwd = match[1]
            self.run.commands.append(["cd", "/d", match[1]])
            return None
        if word in ("call", "pushd", "popd", "start", "(") or command.startswith("("):
            raise BatchModelError(f"comando não modelado: {command}")
        argv = windows_argv(command)
        self.run.commands.append(argv)
        decided = on_failure is not None or checks_errorlevel
        self.errorlevel = 0 if (not decided or self.choices.next()) else 1
        if self.errorlevel and on_failure:
            return ("goto", on_failure)
        return None

    def set_command(self, command: str):
        match = re.fullmatch(r'set\s+"([^"=]+)=(.*)"', command, re.I | re.S)
        if not match:
            raise BatchModelError(f'set fora da forma set "NOME=valor": {command}')
        name, value = match[1].upper(), match[2]
        if value:
            self.env[name] = value
        else:
            self.env.pop(name, None)
        return None

    def if_command(self, text: str):
        match = _IF.match(text)
        insensitive, negate, rest = bool(match[1]), bool(match[2]), match[3]
        if found := re.match(r"defined\s+(\S+)\s+(\S.*)$", rest, re.I | re.S):
            holds, then = found[1].upper() in self.env, found[2]
        elif found := re.match(r'exist\s+("[^"]*"|\S+)\s+(\S.*)$', rest, re.I | re.S):
            holds, then = self.choices.next(), found[2]
        elif found := re.match(r"errorlevel\s+(\d+)\s+(\S.*)$", rest, re.I | re.S):
            holds, then = self.errorlevel >= int(found[1]), found[2]
        elif found := _COMPARE.match(rest):
            left, right, then = found[1], found[2], found[3]
            holds = left.lower() == right.lower() if insensitive else left == right
        else:
            raise BatchSyntaxError(f"if que não se lê: {text}")
        split_line(text)                        # the whole line goes through phase 2
        return self.command(then) if holds != negate else None

    def for_loop(self, text: str):
        match = re.fullmatch(r"for\s+%(\w)\s+in\s+\((.*)\)\s+do\s+(.+)", text, re.I | re.S)
        if not match:
            raise BatchModelError(f"for não modelado: {text}")
        letter, items, body = match[1], windows_argv(match[2]), match[3]
        for item in items:
            step = body.replace(f"%~f{letter}", ntpath.normpath(item)).replace(f"%~{letter}", item)
            jump = self.command(step.replace(f"%{letter}", f'"{item}"'))
            if jump:
                return jump
        return None


def run_batch(lines: list[str], args: list[str], env: dict, choices: list[bool] = (),
              *, strict: bool = True) -> Run:
    """One path: the outside world answers `choices` in order, then says yes."""
    picks = _Choices(list(choices))
    run = _Batch(lines, args, env, picks, strict).execute()
    run.choices = picks.taken
    return run


def every_path(lines: list[str], args: list[str], env: dict) -> list[Run]:
    """Every path the outside world can send the script down (each program that is checked
    failing or succeeding, each file existing or not). A path that breaks raises, with the
    answers that led there in the message."""
    runs, pending = [], [[]]
    while pending:
        given = pending.pop()
        try:
            run = run_batch(lines, args, env, given)
        except (BatchSyntaxError, BatchModelError) as err:
            raise type(err)(f"{err} (respostas de fora: {given})") from err
        runs.append(run)
        pending += [run.choices[:k] + [not run.choices[k]] for k in range(len(given), len(run.choices))]
    return runs
