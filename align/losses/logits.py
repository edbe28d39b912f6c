"""The model's own logits path, run on final hidden states at chosen positions only.

A causal LM does more after its backbone than `lm_head(hidden)`: Cohere multiplies the logits by `logit_scale`,
Granite divides them by `logits_scaling`, Gemma 2/3 soft-cap them with tanh, MiniCPM3 and Inkling scale the
hidden states first, ModernBERT's decoder runs a prediction head before the projection. A table of such cases
goes stale with every new architecture, so the statements between the backbone call and the loss in the model
class's own `forward` are read once (`ast`) and evaluated here on a (1, positions, hidden) chunk: the model's
code, in a small grammar (arithmetic, attribute reads, `if`, and calls to the model's submodules, to functions of
transformers or of the model's own module, to `torch.tanh` and to the tensor methods `float`/`to`/`contiguous`).
A statement outside that grammar is an `UnsupportedLogits` error naming the class and the line, never a
silently different log-prob. `tests/test_architectures.py` parses every `*ForCausalLM` transformers ships.
"""

from __future__ import annotations

import ast
import builtins
import functools
import inspect
import operator
import sys
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from data_builders.errors import UserTypeError


class UnsupportedLogits(UserTypeError):
    """A model's forward post-processes logits in a way this module does not evaluate (the model is the user's choice)."""


# forward arguments a head program may read, bound as the log-prob path calls the model
# (no labels, all positions kept; `input_ids` stands in as a (1, positions) tensor for shape checks)
ARGUMENTS = ("input_ids", "inputs_embeds", "logits_to_keep", "labels", "return_dict")
BUILTINS = frozenset({"isinstance", "slice", "int", "float", "min", "max", "len"})
TORCH_FUNCTIONS = frozenset({"tanh"})  # torch.tanh, nn.functional.tanh, torch.nn.functional.tanh, F.tanh
TENSOR_METHODS = frozenset({"float", "to", "contiguous"})
OUTPUT_FIELDS = frozenset({"last_hidden_state"})

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {ast.Is: operator.is_, ast.IsNot: operator.is_not, ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
            ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}  # fmt: skip
_EXPRESSIONS = (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Attribute, ast.Name, ast.Constant, ast.Subscript,
                ast.Slice, ast.Tuple, ast.Call, ast.keyword, ast.Load, ast.Store, ast.And, ast.Or, *_BINARY, *_UNARY, *_COMPARE)  # fmt: skip
_STATEMENTS = (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.If, ast.Pass)


@dataclass(frozen=True)
class HeadProgram:
    """What a class's forward does from the backbone's output to the logits it returns."""

    owner: str  # the class whose forward this is
    outputs: str  # the name the backbone's output is bound to
    statements: tuple[ast.stmt, ...]
    result: str  # the name holding the returned logits

    def describe(self) -> str:
        return "\n".join(ast.unparse(s) for s in self.statements)


def _is_self_chain(node: ast.AST) -> bool:
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and node.id == "self"


def _backbone_output(stmt: ast.stmt) -> str | None:
    """`outputs = self.<backbone>(input_ids=..., ...)`: the name the backbone's output is bound to."""
    if not isinstance(stmt, (ast.Assign, ast.AnnAssign)) or stmt.value is None:
        return None
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    call = stmt.value
    if len(targets) != 1 or not isinstance(targets[0], ast.Name) or not isinstance(call, ast.Call):
        return None
    if not (isinstance(call.func, ast.Attribute) and _is_self_chain(call.func)):
        return None
    keywords = {k.arg for k in call.keywords}
    if keywords & {"input_ids", "inputs_embeds"} or (call.args and ast.unparse(call.args[0]) == "input_ids"):
        return targets[0].id
    return None


def _ends_program(stmt: ast.stmt) -> bool:
    """The loss (or the return) starts: nothing after it changes the logits the model returns."""
    if isinstance(stmt, ast.Return):
        return True
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return any(isinstance(t, ast.Name) and t.id == "loss" for t in targets)
    return isinstance(stmt, ast.If) and "labels" in ast.unparse(stmt.test)


def _returned_logits(body: Iterable[ast.stmt]) -> str:
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Call):
                for keyword in node.value.keywords:
                    if keyword.arg == "logits" and isinstance(keyword.value, ast.Name):
                        return keyword.value.id
    return "logits"


def parse_head(source: str, owner: str, module_names: Iterable[str]) -> HeadProgram:
    """The head program of a `forward` given as source; `module_names` are the names its module defines or imports.

    Raises `UnsupportedLogits` naming the first statement or expression outside the grammar.
    """
    tree = ast.parse(textwrap.dedent(source))
    forward = next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    outputs, statements = None, []
    for stmt in forward.body:
        if outputs is None:
            outputs = _backbone_output(stmt)
            continue
        if _ends_program(stmt):
            break
        statements.append(stmt)
    if outputs is None:
        raise UnsupportedLogits(f"{owner}.forward: no backbone call `outputs = self.<model>(input_ids=...)` found")
    program = HeadProgram(owner, outputs, tuple(statements), _returned_logits(forward.body))
    _check(program, set(module_names))
    return program


def _check(program: HeadProgram, module_names: set[str]) -> None:
    """Every node in the grammar, every name bound, every call of an allowed kind; otherwise name the line."""
    bound = {"self", program.outputs, *ARGUMENTS}

    def fail(node: ast.AST, why: str) -> None:
        raise UnsupportedLogits(f"{program.owner}.forward post-processes its logits with `{ast.unparse(node)}` ({why}); "
                                "align's log-prob path cannot reproduce it")  # fmt: skip

    def check_expression(node: ast.AST, line: ast.stmt) -> None:
        for sub in ast.walk(node):
            if not isinstance(sub, _EXPRESSIONS):
                fail(line, f"{type(sub).__name__} is not evaluated")
            if isinstance(sub, ast.Name) and sub.id not in bound and sub.id not in module_names and sub.id not in BUILTINS:
                fail(line, f"reads {sub.id!r}")
            if isinstance(sub, ast.Attribute) and sub.attr.startswith("__"):
                fail(line, "reads a private attribute")
            reads_outputs = isinstance(getattr(sub, "value", None), ast.Name) and sub.value.id == program.outputs
            if reads_outputs and isinstance(sub, ast.Attribute) and sub.attr not in OUTPUT_FIELDS:
                fail(line, f"reads the backbone's {sub.attr!r}")
            if reads_outputs and isinstance(sub, ast.Subscript) and not (isinstance(sub.slice, ast.Constant) and sub.slice.value == 0):
                fail(line, "reads the backbone's outputs beyond the last hidden state")
            if isinstance(sub, ast.Call) and not _allowed_call(sub.func, module_names):
                fail(line, f"calls {ast.unparse(sub.func)}")

    def check_block(body: Iterable[ast.stmt]) -> None:
        for stmt in body:
            if not isinstance(stmt, _STATEMENTS):
                fail(stmt, f"a {type(stmt).__name__} statement")
            if isinstance(stmt, ast.If):
                check_expression(stmt.test, stmt)
                check_block(stmt.body)
                check_block(stmt.orelse)
                continue
            if isinstance(stmt, ast.Pass):
                continue
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if not all(isinstance(t, ast.Name) for t in targets):
                fail(stmt, "assigns to something other than a name")
            if stmt.value is None:
                fail(stmt, "a bare annotation")
            check_expression(stmt.value, stmt)
            bound.update(t.id for t in targets)

    check_block(program.statements)


def _allowed_call(func: ast.AST, module_names: set[str]) -> bool:
    if isinstance(func, ast.Name):
        return func.id in BUILTINS or func.id in module_names
    if not isinstance(func, ast.Attribute):
        return False
    if _is_self_chain(func):
        return True  # a submodule of the model (checked to be one when evaluated)
    dotted = ast.unparse(func)
    if func.attr in TORCH_FUNCTIONS and dotted in (f"torch.{func.attr}", f"nn.functional.{func.attr}", f"torch.nn.functional.{func.attr}",
                                                   f"F.{func.attr}"):  # fmt: skip
        return True
    return func.attr in TENSOR_METHODS


class _BackboneOutput:
    """Stands in for the backbone's output: its last hidden state, by field or by index 0."""

    def __init__(self, hidden: torch.Tensor):
        self.last_hidden_state = hidden

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.last_hidden_state


class _Evaluator:
    def __init__(self, program: HeadProgram, model: torch.nn.Module, module_globals: dict[str, Any], hidden: torch.Tensor):
        self.program, self.model, self.globals = program, model, module_globals
        arguments = {"input_ids": torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device), "inputs_embeds": None,
                     "logits_to_keep": 0, "labels": None, "return_dict": True}  # fmt: skip
        self.names: dict[str, Any] = {"self": model, program.outputs: _BackboneOutput(hidden), **arguments}

    def run(self) -> torch.Tensor:
        self.block(self.program.statements)
        return self.names[self.program.result]

    def block(self, body: Iterable[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.If):
                self.block(stmt.body if self.expr(stmt.test) else stmt.orelse)
            elif isinstance(stmt, ast.AugAssign):
                self.names[stmt.target.id] = _BINARY[type(stmt.op)](self.names[stmt.target.id], self.expr(stmt.value))
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                value = self.expr(stmt.value)
                for target in stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]:
                    self.names[target.id] = value

    def expr(self, node: ast.AST) -> Any:  # noqa: C901 - one branch per node type of the grammar
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            if node.id in self.globals:
                return self.globals[node.id]
            return getattr(builtins, node.id)
        if isinstance(node, ast.Attribute):
            return getattr(self.expr(node.value), node.attr)
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](self.expr(node.left), self.expr(node.right))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self.expr(node.operand))
        if isinstance(node, ast.BoolOp):
            value = None
            for operand in node.values:
                value = self.expr(operand)
                if isinstance(node.op, ast.And) != bool(value):
                    return value
            return value
        if isinstance(node, ast.Compare):
            left = self.expr(node.left)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self.expr(comparator)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.expr(node.body) if self.expr(node.test) else self.expr(node.orelse)
        if isinstance(node, ast.Subscript):
            return self.expr(node.value)[self.expr(node.slice)]
        if isinstance(node, ast.Slice):
            return slice(*(self.expr(p) if p is not None else None for p in (node.lower, node.upper, node.step)))
        if isinstance(node, ast.Tuple):
            return tuple(self.expr(e) for e in node.elts)
        if isinstance(node, ast.Call):
            return self.call(node)
        raise UnsupportedLogits(f"{self.program.owner}: cannot evaluate {ast.unparse(node)}")

    def call(self, node: ast.Call) -> Any:
        func = self.expr(node.func)
        if isinstance(node.func, ast.Attribute) and _is_self_chain(node.func) and not isinstance(func, torch.nn.Module):
            raise UnsupportedLogits(f"{self.program.owner}.forward calls {ast.unparse(node.func)}, which is not a submodule")
        if isinstance(node.func, ast.Name) and node.func.id not in BUILTINS and node.func.id not in self.names:
            module = getattr(func, "__module__", "") or ""
            if not (module.startswith("transformers") or module == self.globals.get("__name__")):
                raise UnsupportedLogits(f"{self.program.owner}.forward calls {node.func.id} from {module or 'unknown'}")
        args = [self.expr(a) for a in node.args]
        kwargs = {k.arg: self.expr(k.value) for k in node.keywords}
        return func(*args, **kwargs)


def language_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside DeepSpeed, DDP, PEFT and actor-critic wrappers: the first one that has an LM head."""
    for module in getattr(model, "module", model).modules():
        if isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None:
            return module
    raise TypeError(f"{type(model).__name__} holds no transformers model with an LM head")


def _module_names(module_globals: dict[str, Any]) -> set[str]:
    return {name for name, value in module_globals.items() if not name.startswith("__")}


@functools.cache
def head_program(cls: type) -> HeadProgram:
    """The head program of a model class's forward (its own or the one it inherits), parsed once per class."""
    forward = inspect.unwrap(cls.forward)
    owner = forward.__qualname__.split(".")[0]
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError) as err:
        raise UnsupportedLogits(f"{owner}.forward has no readable source, so its logits path cannot be checked") from err
    return parse_head(source, owner, _module_names(sys.modules[forward.__module__].__dict__))


class LogitsPath:
    """`path(hidden)` → fp32 logits (positions, vocab) for final hidden states (positions, hidden), as the model computes them."""

    def __init__(self, model: torch.nn.Module):
        self.model = language_model(model)
        self.program = head_program(type(self.model))
        self.globals = sys.modules[inspect.unwrap(type(self.model).forward).__module__].__dict__

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = _Evaluator(self.program, self.model, self.globals, hidden.unsqueeze(0)).run()
        return logits.squeeze(0).float()


def logits_path(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return LogitsPath(model)
