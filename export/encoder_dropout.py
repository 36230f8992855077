"""A classifier's graph with the fine-tune's own dropout behind a switch (issue 36: stochastic passes).

The checkpoint is exported in training mode (PyTorch's TorchScript exporter, optimum's ONNX configuration for the
task: the same inputs, outputs and dynamic axes as optimum's export), so that every dropout layer of the model
(embeddings, attention probabilities, attention output and feed-forward of every layer, the head) becomes an ONNX
``Dropout``. Each becomes ``If(dropout, then: Dropout(x, ratio, training=true), else: Identity(x))``, and
``dropout`` is a boolean graph input with an initializer ``false``: a caller that feeds nothing (onnxruntime lists
the input among the overridable initializers, not ``get_inputs()``) runs the deterministic graph (equal to
optimum's eval-mode export, 0.0 difference measured); ``dropout=True`` makes each row of a batch one Monte-Carlo
pass. The If is needed: onnxruntime's ``EliminateDropout`` optimisation deletes a top-level Dropout whatever its
``training_mode`` says; inside a branch it is kept. Weights stay at the top level (constant folding on), so
``quantize_dynamic`` quantises this graph as it does optimum's. Measured (2 cores): not fed, the same speed as
optimum's graph within noise; fed, 1.25x per row on a MiniLM-sized model.
"""

from __future__ import annotations

import shutil
import tempfile
from itertools import chain
from pathlib import Path
from typing import Any

DROPOUT_INPUT = "dropout"


def export_with_dropout(source: Path, target: Path, task: str) -> int:
    """Export ``source`` for ``task`` (optimum's task name) into the ONNX file ``target`` with the dropout switch;
    returns how many dropout layers it switches (an ``ExportError`` if none)."""
    import onnx
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configurations: lazy module)
    import torch
    from edgeroute.errors import ExportError
    from optimum.exporters.tasks import TasksManager

    task = TasksManager.map_from_synonym(task)
    model = TasksManager.get_model_from_task(task, str(source), framework="pt", library_name="transformers")
    constructor = TasksManager.get_exporter_config_constructor(
        "onnx", model=model, task=task, library_name="transformers"
    )
    config = constructor(model.config)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    dummy = config.rename_ambiguous_inputs(config.generate_dummy_inputs(framework="pt"))
    tmp = Path(tempfile.mkdtemp(prefix="edgeroute-dropout-"))
    try:
        with torch.no_grad(), config.patch_model_for_export(model):
            inputs, outputs = config.ordered_inputs(model), config.outputs
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp / "model.onnx"),
                dynamo=False,
                training=torch.onnx.TrainingMode.TRAINING,
                do_constant_folding=True,  # weights as initializers, not Transpose(W): quantize_dynamic needs it
                opset_version=max(18, config.DEFAULT_ONNX_OPSET),
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes=dict(chain(inputs.items(), outputs.items())),
            )
        graph = onnx.load(str(tmp / "model.onnx"))
    finally:
        model.eval()
        shutil.rmtree(tmp, ignore_errors=True)
    switched = add_dropout_switch(graph)
    if switched == 0:
        raise ExportError(f"{source}: the training-mode export has no dropout layer to switch")
    if graph.ByteSize() > 2**31 - 2**28:  # protobuf's 2 GB: the weights beside the graph
        onnx.save_model(
            graph, str(target), save_as_external_data=True, location=f"{target.name}.data", size_threshold=1024
        )
    else:
        onnx.save_model(graph, str(target))
    return switched


def add_dropout_switch(model: Any, name: str = DROPOUT_INPUT) -> int:
    """Put every ``Dropout`` of ``model`` (an ``onnx.ModelProto``) behind the boolean input ``name`` (default
    false); returns how many."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    model.ir_version = max(model.ir_version, 4)  # an input with an initializer (an optional input) needs IR 4
    if any(i.name == name for i in chain(g.input, g.initializer)):
        raise ValueError(f"the graph already has a value named {name!r}")
    types = _value_types(model)
    on = f"{name}__true"
    nodes, switched = [], 0
    for k, node in enumerate(g.node):
        if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        if len(node.input) < 2 or not node.input[1]:
            raise ValueError(f"Dropout {node.name!r} has no ratio input (opset < 12)")
        x, ratio, y = node.input[0], node.input[1], node.output[0]
        tag = f"{name}_if{k}"
        elem = types.get(x, TensorProto.FLOAT)
        then = helper.make_graph(
            [helper.make_node("Dropout", [x, ratio, on], [f"{tag}_on"], name=f"{tag}/Dropout")],
            f"{tag}_then",
            [],
            [helper.make_tensor_value_info(f"{tag}_on", elem, None)],
        )
        other = helper.make_graph(
            [helper.make_node("Identity", [x], [f"{tag}_off"], name=f"{tag}/Identity")],
            f"{tag}_else",
            [],
            [helper.make_tensor_value_info(f"{tag}_off", elem, None)],
        )
        nodes.append(helper.make_node("If", [name], [y], name=node.name or tag, then_branch=then, else_branch=other))
        switched += 1
    del g.node[:]
    g.node.extend(nodes)
    g.input.append(helper.make_tensor_value_info(name, TensorProto.BOOL, []))
    g.initializer.append(numpy_helper.from_array(np.array(False), name))  # not fed: deterministic
    g.initializer.append(numpy_helper.from_array(np.array(True), on))
    _remove_dead_nodes(g)
    return switched


def _value_types(model: Any) -> dict[str, int]:
    """Element types of the graph's values (shape inference over a copy without its large weights)."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for t in light.graph.initializer:
        if len(t.raw_data) > 2**20:
            t.ClearField("raw_data")
            t.dims[:] = [0]
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:  # noqa: BLE001 - shape inference is a convenience: float is the default
        return {}
    values = chain(inferred.graph.value_info, inferred.graph.input, inferred.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in values}


def _node_inputs(node: Any) -> list[str]:
    """A node's inputs, with the outer-scope names its subgraphs (If branches) read."""
    import onnx

    names = [i for i in node.input if i]
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for n in sub.node:
                names.extend(_node_inputs(n))
    return names


def _remove_dead_nodes(g: Any) -> None:
    """Drop the nodes no graph output depends on (the dropouts' unused mask outputs' producers and the like)."""
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(list(g.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(_node_inputs(node))
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
