"""From the walk's records to :class:`~skmerge.graph.Space` objects.

1. Entries of a parameter bound to several channels make those channels one
   (or dual) channel: a weight shared by two modules is transformed once.
2. Channels joined to FIXED are dropped (the model's inputs and outputs).
3. Channels created by one layer may be mixed by one map; layers whose
   channels were joined (a residual stream) share it; a set of channels that
   some op reads without the rest of its layer's channels (a ``chunk``, the
   queries of a fused ``qkv``) splits off: the coarsest partition that every
   reading op respects gives the spaces.
4. Within a space, channels linked to blocks (heads, groups) are ordered by
   block and the space is block-diagonal.
5. Every bound parameter entry becomes a producer or consumer slice, every
   tap a :class:`~skmerge.graph.GraphTap`.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict

import torch

from ._labels import CONSUMER, FIXED, PRODUCER
from ._spaces import AveragingFallbackWarning, GraphTap, ParamSlice, Space, UnsupportedOperationError
from ._unionfind import UnionFind
from ._walk import Records


def _resolve_bindings(rec: Records):
    """One (atom, role, kind) per parameter entry; repeated entries join their channels.

    kind: 0 a vector entry, 1 a variance, 2 a scale (see ``ParamSlice``).
    """
    by_key = defaultdict(list)
    for b in rec.bindings:
        by_key[(b.param, b.axis)].append(b)
    resolved = {}
    for key, items in by_key.items():
        pos = torch.cat([b.positions for b in items])
        atoms = torch.cat([b.atoms for b in items])
        roles = torch.cat([torch.full_like(b.positions, b.role) for b in items])
        var = torch.cat([torch.full_like(b.positions, int(b.variance) + 2 * int(b.scale)) for b in items])
        order = torch.argsort(pos, stable=True)
        pos, atoms, roles, var = pos[order], atoms[order], roles[order], var[order]
        first = torch.ones_like(pos, dtype=torch.bool)
        first[1:] = pos[1:] != pos[:-1]
        run_start = torch.cumsum(first.long(), 0) - 1
        starts = torch.nonzero(first).reshape(-1)
        head = starts[run_start]
        dup = torch.nonzero(~first).reshape(-1)
        if dup.numel():
            pairs = torch.stack([atoms[head[dup]], atoms[dup], roles[head[dup]] ^ roles[dup]], 1)
            for a, b, parity in torch.unique(pairs, dim=0).tolist():
                rec.uf.union(a, b, parity)
        resolved[key] = (pos[first], atoms[first], roles[first], var[first])
    return resolved


class _Classes:
    """Union-find classes of the walk's elements, with parities and orientation."""

    def __init__(self, rec: Records):
        self.rec = rec
        n = len(rec.uf)
        roots, parity = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
        for a in range(n):
            roots[a], parity[a] = rec.uf.find(a)
        self.root, self.parity = roots, parity
        self.fixed_root = int(roots[FIXED])
        self.producer_of = torch.full((n,), -1, dtype=torch.long)
        for i, p in enumerate(rec.producers):
            self.producer_of[p.start:p.start + p.count] = i
        self.family_of = torch.full((n,), -1, dtype=torch.long)
        for i, f in enumerate(rec.families):
            self.family_of[f.start:f.start + f.count] = i
        ids = torch.arange(n)
        self.first = torch.full((n,), n, dtype=torch.long).scatter_reduce(0, roots, ids, "amin")
        self.size = torch.bincount(roots, minlength=n)
        self.producers_of_root = defaultdict(set)
        has = self.producer_of >= 0
        for r, p in torch.unique(torch.stack([roots[has], self.producer_of[has]], 1), dim=0).tolist():
            self.producers_of_root[r].add(p)
        self.linked = defaultdict(set)  # class root -> block-element roots
        for atoms, elements in rec.links:
            for r, e in torch.unique(torch.stack([roots[atoms], roots[elements]], 1), dim=0).tolist():
                self.linked[r].add(e)


def _groups(c: _Classes, rec: Records) -> dict[int, list[int]]:
    """Refined groups: class roots that one map may mix, keyed by a representative."""
    feature = c.producer_of >= 0
    atoms = torch.nonzero(feature).reshape(-1)
    roots = c.root[atoms]
    alive = roots != c.fixed_root
    atoms, roots = atoms[alive], roots[alive]
    # layers whose channels were joined share one map
    merged = UnionFind()
    for _ in rec.producers:
        merged.add()
    first_producer = {}
    for a, r in zip(atoms.tolist(), roots.tolist()):
        p = int(c.producer_of[a])
        if r in first_producer:
            merged.union(first_producer[r], p)
        else:
            first_producer[r] = p
    # reading ops split the groups: classes read by different sets of ops part
    signature = defaultdict(list)
    for i, read in enumerate(rec.reads):
        for r in torch.unique(c.root[read]).tolist():
            if r in first_producer:
                signature[r].append(i)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for r, p in first_producer.items():
        groups[(merged.find(p), tuple(signature[r]))].append(r)
    return groups


def _class_order(c: _Classes, roots: list[int]) -> list[int]:
    """Classes in the order their first channel was created."""
    first = {r: int(c.first[r]) for r in roots}
    return sorted(roots, key=lambda r: first[r]), first


def _blocks(c: _Classes, rec: Records, roots: list[int]):
    """Blocks of a group: ``{block element root: [class roots]}`` from the links, or None."""
    members = {r: c.linked.get(r, set()) for r in roots}
    if not any(members.values()):
        return None
    merged = UnionFind()
    index = {}
    for es in members.values():
        for e in es:
            index.setdefault(e, merged.add())
        es = list(es)
        for e in es[1:]:
            merged.union(index[es[0]], index[e])
    blocks = defaultdict(list)
    for r, es in members.items():
        key = merged.find(index[next(iter(es))]) if es else None
        blocks[key].append(r)
    return blocks, index, merged


def _family_name(c: _Classes, rec: Records, block_roots: list[int]) -> str | None:
    """The heads family of blocks whose elements are untouched by anything else, else None."""
    families = set()
    if not block_roots:
        return None
    for e in block_roots:
        if int(c.size[e]) != 1 or e == c.fixed_root:
            return None
        fam = int(c.family_of[e])
        if fam < 0 or rec.families[fam].kind != "heads":
            return None
        families.add(fam)
    if len(families) != 1:
        return None
    fam = rec.families[families.pop()]
    if fam.count != len(block_roots):
        return None
    return f"heads of {fam.module_path or fam.node}"


def _positions_per_channel(channels: torch.Tensor, positions: torch.Tensor, d: int):
    """``(d, k)`` positions grouped by channel, or None when the channels have unequal counts."""
    counts = torch.bincount(channels, minlength=d)
    if counts.numel() == 0 or int(counts.min()) != int(counts.max()) or int(counts[0]) == 0:
        return None
    order = torch.argsort(channels * (int(positions.max()) + 1) + positions)
    return positions[order].reshape(d, int(counts[0]))


def _slices(name: str, axis: int, index: torch.Tensor, shape: tuple, kind: int, aliases) -> list:
    if axis < 0:  # flat positions over the whole tensor
        slice_axis, flat = 0, True
    elif index.shape[1] > 1:  # several rows per channel: their entries, over tensor.flatten(axis)
        inner = math.prod(shape[axis + 1:])
        index = (index[:, :, None] * inner + torch.arange(inner)).reshape(index.shape[0], -1)
        slice_axis, flat = axis, True
    else:
        slice_axis, flat = axis, False
    return [ParamSlice(alias, slice_axis, index, kind == 1, flat, scale=kind == 2)
            for alias in aliases.get(name, [name])]


def collect(walker) -> list[Space]:
    rec = walker.rec
    resolved = _resolve_bindings(rec)
    c = _Classes(rec)
    groups = _groups(c, rec)
    conflicted = {r for r in set(c.root.tolist()) if rec.uf.conflicted(r)}

    # channel layout of every space: (space index, channel) per class root
    spaces_meta = []
    where = {}
    for roots in groups.values():
        ordered, first_atom = _class_order(c, roots)
        parts = [(ordered, None, None)]
        found = _blocks(c, rec, ordered)
        if found is not None:
            blocks, _, _ = found
            sizes = {len(v) for v in blocks.values()}
            if None not in blocks and len(sizes) == 1 and len(blocks) > 1:
                keys = sorted(blocks, key=lambda k: min(first_atom[r] for r in blocks[k]))
                ordered = [r for k in keys for r in sorted(blocks[k], key=lambda r: first_atom[r])]
                family = _family_name(c, rec, _block_roots(c, keys, blocks))
                parts = [(ordered, sizes.pop(), family)]
            else:  # blocks of different sizes: one space per block
                parts = [(sorted(v, key=lambda r: first_atom[r]), None, None)
                         for v in sorted(blocks.values(), key=lambda v: min(first_atom[r] for r in v))]
        for ordered_part, block, family in parts:
            s = len(spaces_meta)
            orient = {r: int(c.parity[first_atom[r]]) for r in ordered_part}
            spaces_meta.append({"roots": ordered_part, "block": block, "family": family, "orient": orient,
                                "first": min(first_atom[r] for r in ordered_part)})
            for ch, r in enumerate(ordered_part):
                where[r] = (s, ch)

    n_atoms = len(rec.uf)
    root_space = torch.full((n_atoms,), -1, dtype=torch.long)
    root_channel = torch.full((n_atoms,), -1, dtype=torch.long)
    root_orient = torch.zeros(n_atoms, dtype=torch.long)
    for r, (s, ch) in where.items():
        root_space[r], root_channel[r] = s, ch
        root_orient[r] = spaces_meta[s]["orient"][r]
    space_of, channel_of = root_space[c.root], root_channel[c.root]
    flip = c.parity ^ root_orient[c.root]
    nodes = {node.name: node for node in walker.t.graph.nodes}

    producers = defaultdict(list)
    consumers = defaultdict(list)
    shapes = walker.param_shapes
    for (name, axis), (pos, atoms, roles, var) in resolved.items():
        live = atoms > FIXED
        pos, atoms, roles, var = pos[live], atoms[live], roles[live], var[live]
        s_of = space_of[atoms]
        inside = s_of >= 0
        pos, atoms, roles, var, s_of = pos[inside], atoms[inside], roles[inside], var[inside], s_of[inside]
        effective = roles ^ flip[atoms]
        for s in torch.unique(s_of).tolist():
            meta = spaces_meta[s]
            d = len(meta["roots"])
            for role in (PRODUCER, CONSUMER):
                for kind in (0, 1, 2):
                    mask = (s_of == s) & (effective == role) & (var == kind)
                    if not bool(mask.any()):
                        continue
                    index = _positions_per_channel(channel_of[atoms[mask]], pos[mask], d)
                    if index is None:
                        raise UnsupportedOperationError(
                            f"the channels of space {_space_name(c, rec, meta)!r} own different numbers of "
                            f"entries of {name!r} (or some own none): skmerge cannot transform that "
                            "parameter consistently.")
                    target = producers if role == PRODUCER else consumers
                    target[s].extend(_slices(name, axis, index, shapes.get(name, ()), kind,
                                             walker.t.aliases))

    taps, fallback_taps = defaultdict(list), defaultdict(list)
    for node_name, lay, shape, fallback in rec.taps:
        labels = lay.labels.reshape(-1)
        valid = labels > FIXED
        s_of = torch.full_like(labels, -1)
        s_of[valid] = space_of[labels[valid]]
        orientation = torch.zeros_like(labels)
        orientation[valid] = flip[labels[valid]]
        for s in torch.unique(s_of[s_of >= 0]).tolist():
            d = len(spaces_meta[s]["roots"])
            for dual in (0, 1):  # queries and keys of one fused projection: two taps
                mask = (s_of == s) & (orientation == dual)
                if not bool(mask.any()):
                    continue
                chans = channel_of[labels[mask]]
                index = _positions_per_channel(chans, torch.nonzero(mask).reshape(-1), d)
                if index is None:
                    continue  # the tensor holds only some channels of the space
                module = walker.t.module_path(nodes[node_name])
                (fallback_taps if fallback else taps)[s].append(
                    _graph_tap(node_name, lay, index, bool(dual), module, chans, mask))
    for s, found in fallback_taps.items():
        if not taps[s]:
            taps[s] = found

    order = sorted(range(len(spaces_meta)), key=lambda s: spaces_meta[s]["first"])
    kept = [s for s in order if taps[s] and producers[s] and consumers[s]]
    # never observed, nothing creates it or nothing reads it: nothing to align. Spaces whose
    # heads are matched together (query-key and value-output) go together: a head order
    # applied to some of them only would change the function.
    dropped = {spaces_meta[s]["family"] for s in order if s not in kept and spaces_meta[s]["family"] is not None}
    spaces = []
    for s in kept:
        meta = spaces_meta[s]
        if meta["family"] is not None and meta["family"] in dropped:
            continue
        d = len(meta["roots"])
        spaces.append(Space(
            d, _dedup(producers[s]), _dedup(consumers[s]), tuple(taps[s]), meta["block"] or d,
            _space_name(c, rec, meta), orthogonal=any(r in conflicted for r in meta["roots"]),
            block_family=meta["family"]))
    _distinct_names(spaces)
    _warn(walker, c, rec)
    return spaces


def _block_roots(c, keys, blocks):
    """The block-element class of each block (the roots the links point to)."""
    out = []
    for k in keys:
        elems = set().union(*(c.linked.get(r, set()) for r in blocks[k]))
        if len(elems) != 1:
            return []
        out.append(elems.pop())
    return out


def _graph_tap(node_name, lay, index, dual, module, chans, mask):
    """A GraphTap on the layout's axes, dropping axes along which the channels do not vary."""
    sizes = tuple(lay.labels.shape)
    if len(lay.axes) > 1:
        grid = torch.full((math.prod(sizes),), -1, dtype=torch.long)
        grid[mask] = chans
        grid = grid.reshape(sizes)
        keep = [i for i in range(len(sizes)) if sizes[i] > 1 and
                not torch.equal(grid, grid.narrow(i, 0, 1).expand_as(grid))]
        if len(keep) < len(sizes) and keep:
            sub = grid[tuple(slice(None) if i in keep else 0 for i in range(len(sizes)))]
            positions = torch.arange(sub.numel()).reshape(-1)
            flat = sub.reshape(-1)
            ok = flat >= 0
            sub_index = _positions_per_channel(flat[ok], positions[ok], index.shape[0])
            if sub_index is not None:
                return GraphTap(node_name, tuple(lay.axes[i] for i in keep), sub_index, dual, module)
    return GraphTap(node_name, lay.axes, index, dual, module)


def _dedup(slices: list) -> list:
    out = []
    for s in slices:
        if s not in out:
            out.append(s)
    return out


def _space_name(c: _Classes, rec: Records, meta: dict) -> str:
    producers = sorted(set().union(*(c.producers_of_root.get(r, set()) for r in meta["roots"])))
    layers = [p for p in producers if rec.producers[p].kind == "layer"] or producers
    names = []  # a module called twice (shared weights) counts once
    for p in layers:
        name = rec.producers[p].name
        if name not in names:
            names.append(name)
    return names[0] + (f" (+{len(names) - 1} joined)" if len(names) > 1 else "")


def _distinct_names(spaces: list) -> None:
    """Spaces cut from one layer's channels (a fused qkv, a channel split) get distinct names."""
    by_name: dict = defaultdict(list)
    for space in spaces:
        by_name[space.name].append(space)
    for name, group in by_name.items():
        if len(group) < 2:
            continue
        attention = any(t.dual for space in group for t in space.taps)
        for space in group:
            if attention and space.block_size < space.dim:
                role = "query-key" if any(t.dual for t in space.taps) else "value-output"
                space.name = f"{name} ({role})"
            else:
                first = space.producers[0]
                rows = first.index[:, 0] if first.index.shape[1] == 1 else first.index.reshape(-1)
                lo, hi = int(rows.min()), int(rows.max()) + 1
                space.name = f"{name} [{lo}:{hi}]" if hi - lo == space.dim else f"{name} [{space.dim} of them]"


def _warn(walker, c: _Classes, rec: Records) -> None:
    messages = list(walker.warnings)
    for event in rec.fixes:
        if not event.warn:
            continue
        producers = sorted({rec.producers[int(p)].module_path or rec.producers[int(p)].node
                            for p in c.producer_of[event.atoms].tolist() if p >= 0})
        if not producers:
            continue
        where = event.module_path or "the top level of the model"
        messages.append(f"{where}: the channels of {', '.join(repr(p) for p in producers[:4])} are "
                        f"{event.reason}; they keep each model's basis (the merge falls back to "
                        "averaging there)")
    seen = set()
    for message in messages:
        if message not in seen:
            seen.add(message)
            warnings.warn(message, AveragingFallbackWarning, stacklevel=4)
