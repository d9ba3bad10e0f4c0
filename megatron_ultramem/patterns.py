"""Layer-selection spellings shared by the config, the Megatron-LM arguments and the sizing helper.

Standard library only: the sizing helper and the launch scripts import it without torch/Megatron.
"""

import ast
from typing import List, Tuple


def _eval_pattern(node):
    """Evaluate a list expression of ints, '+' and '*' only (no eval: config strings are data)."""
    if isinstance(node, ast.Expression):
        return _eval_pattern(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval_pattern(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _eval_pattern(node.left), _eval_pattern(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise ValueError(f"unsupported element {ast.dump(node)}")


def parse_layer_pattern(
    value, num_layers: int, name: str = "ultramem_layers", allow_empty: bool = False
) -> List[int]:
    """Expand an int / list / string layer selection into a 0/1 list of length num_layers.

    The spelling of Megatron's `moe_layer_freq` (and of --moe-layer-freq / --ultramem-layers):
    an int N selects layer i when i % N == 0; a list has one 0/1 per layer; a string is a list
    expression of ints, '+' and '*' such as "([0]*3+[1])*2" (parsed, never eval'd).
    """
    if isinstance(value, str):
        try:
            value = _eval_pattern(ast.parse(value.strip(), mode="eval"))
        except (SyntaxError, ValueError) as err:
            raise ValueError(
                f"{name}={value!r} is not a layer pattern: use an int N (every N-th layer), a "
                f'list of 0/1 like "[0,1,0,1]", or an expression like "([0]*3+[1])*2" ({err})'
            ) from None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int >= 1, a list of 0/1 or a pattern string")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{name} as an int must be >= 1 (one memory every N layers), got {value}")
        return [1 if i % value == 0 else 0 for i in range(num_layers)]
    pattern = list(value)
    if len(pattern) != num_layers:
        raise ValueError(
            f"{name} has {len(pattern)} entries but num_layers is {num_layers}: give one 0/1 per layer"
        )
    if any(p not in (0, 1) for p in pattern):
        raise ValueError(f"{name} entries must be 0 or 1, got {pattern}")
    if sum(pattern) == 0 and not allow_empty:
        raise ValueError(f"{name}={value!r} selects no layer: at least one entry must be 1")
    return pattern


def parse_skip_units(value, num_layers: int) -> List[Tuple[int, int]]:
    """Parse "i:j,i:j" (or a list of pairs) into validated 0-based (i, j) units."""
    if value is None:
        return []
    if isinstance(value, str):
        units = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            bits = part.split(":")
            if len(bits) != 2 or not all(b.strip().lstrip("-").isdigit() for b in bits):
                raise ValueError(
                    f'ultramem_skip_units: "{part}" is not "i:j" (two 0-based block indices)'
                )
            units.append((int(bits[0]), int(bits[1])))
    else:
        units = [tuple(u) for u in value]
    sources = set()
    for i, j in units:
        if not 0 <= i <= j:
            raise ValueError(f"ultramem_skip_units: unit {i}:{j} needs 0 <= i <= j")
        if j >= num_layers:
            raise ValueError(
                f"ultramem_skip_units: unit {i}:{j} points past the last layer "
                f"(num_layers={num_layers}, allowed block indices 0..{num_layers - 1})"
            )
        if i in sources:
            raise ValueError(f"ultramem_skip_units: block {i} is the source of two units")
        sources.add(i)
    return units
