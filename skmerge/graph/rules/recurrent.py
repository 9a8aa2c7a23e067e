"""Recurrent layers: LSTM and GRU (``aten.lstm`` / ``aten.gru``).

Each layer (and direction) creates a hidden space of ``hidden_size``
channels. The gates are stacked in the weights (``4 * hidden`` rows for an
LSTM, ``3 *`` for a GRU): every gate block of ``weight_ih``, ``weight_hh`` and
the biases is a producer of the hidden channels, the columns of ``weight_hh``
read them (the recurrence) and so do the next layer's ``weight_ih`` columns.
Exact for permutations; the gates are elementwise nonlinearities, so dense
maps are approximate, as everywhere else.
"""

from __future__ import annotations

import torch

from .._labels import CONSUMER, PRODUCER, Layout
from ._registry import ops, rule


def _recurrent(w, node, gates: int):
    args = w.args(node)
    inp, hx, params = args["input"], args["hx"], list(args["params"])
    has_biases = bool(w.value(args["has_biases"]))
    layers = int(w.value(args["num_layers"]))
    directions = 2 if bool(w.value(args["bidirectional"])) else 1
    per = 4 if has_biases else 2
    if len(params) != layers * directions * per:
        w.fail("a recurrent layer with projections (proj_size) or an unexpected parameter list")
    refs = [w.param(p) for p in params]
    if any(r is None for r in refs):
        w.fail("recurrent weights computed in the graph")
    hx = hx if isinstance(hx, (list, tuple)) else [hx]
    states_from_inputs = False
    for h in hx:
        lay = w.layout(h)
        if lay is None or not lay.inert:
            w.fail("an initial hidden state computed from features")
        states_from_inputs = states_from_inputs or lay.origin == "input"
    shape = w.shape(inp)
    lay = w.collapse(w.layout(inp), shape, (len(shape) - 1,))
    columns = lay.grid(shape, (len(shape) - 1,)).reshape(-1)
    w.consumer_input(inp)
    finals = []
    for layer in range(layers):
        outputs = []
        for direction in range(directions):
            base = (layer * directions + direction) * per
            w_ih, w_hh = refs[base], refs[base + 1]
            hidden = w_hh.shape[1]
            path = w.t.module_path(node)
            suffix = f"l{layer}" + ("_reverse" if direction else "")
            atoms = w.new_atoms(hidden, label=f"{path}.{suffix}" if path else suffix)
            rows = torch.arange(gates * hidden)
            tiled = atoms.repeat(gates)
            w.read(columns)
            w.bind(w_ih.name, 1, torch.arange(columns.numel()), columns, CONSUMER)
            w.bind(w_ih.name, 0, rows, tiled, PRODUCER)
            w.bind(w_hh.name, 0, rows, tiled, PRODUCER)
            w.bind(w_hh.name, 1, torch.arange(hidden), atoms, CONSUMER)
            if has_biases:
                for ref in refs[base + 2:base + 4]:
                    w.bind(ref.name, 0, rows, tiled, PRODUCER)
            if states_from_inputs:
                w.fix(atoms, reason="an initial state given as a model input")
            outputs.append(atoms)
            finals.append(atoms)
        columns = torch.cat(outputs)
    out_shape = w.t.shapes[node]
    output = Layout.along(len(out_shape[0]) - 1, columns, len(out_shape[0]))
    states = Layout.from_full(torch.stack(finals)[:, None, :].expand(out_shape[1]))
    w.former(node)
    return [output] + [states] * (len(out_shape) - 1)


@rule(*ops("lstm"))
def lstm(w, node):
    return _recurrent(w, node, 4)


@rule(*ops("gru"))
def gru(w, node):
    return _recurrent(w, node, 3)
