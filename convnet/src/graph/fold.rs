//! The inference form of a graph: BatchNorm folded into the convolution before it, and
//! activations and residual additions fused into the convolution or linear layer that
//! produces their input, so that each becomes one pass over memory. Shared by the fp32
//! inference plan and by quantization (whose quantized values are the fused outputs).
//!
//! Folding (in float64, rounded once): with `s = gamma / sqrt(var + eps)`,
//! `w' = w * s` per output channel and `b' = (b - mean) * s + beta`.
//!
//! ```
//! use convnet::graph::{fold, Op};
//! let model = convnet::models::build("resnet20", [3, 32, 32], 10)?;
//! let fused = fold::fuse(&model.graph()?)?;
//! // 19 convolutions with their BatchNorm, ReLU and residual additions folded in, the
//! // two option-A shortcuts, the pooling, the flatten and the classifier.
//! let kinds: Vec<&str> = fused.nodes().iter().map(|n| n.op.kind()).collect();
//! assert_eq!(kinds.iter().filter(|k| **k == "Conv2d").count(), 19);
//! assert!(!kinds.contains(&"BatchNorm2d") && !kinds.contains(&"Add") && !kinds.contains(&"ReLU"));
//! # Ok::<(), convnet::Error>(())
//! ```

use super::{Graph, Node, Op, ValueId};
use crate::error::Result;
use crate::tensor::Tensor;

/// A graph under construction whose nodes can be retired (folded away) and moved.
struct Builder {
    nodes: Vec<Node>,
    dead: Vec<bool>,
    /// How many nodes of the source graph read each source value.
    readers: Vec<usize>,
    /// For each source value: the builder node holding it.
    map: Vec<usize>,
}

impl Builder {
    fn add(&mut self, node: Node) -> usize {
        self.nodes.push(node);
        self.dead.push(false);
        self.nodes.len() - 1
    }

    /// Moves node `i` to the end (it must be read by nothing in between) and returns its
    /// new index.
    fn move_to_end(&mut self, i: usize) -> usize {
        let node = self.nodes[i].clone();
        self.dead[i] = true;
        let j = self.add(node);
        for m in &mut self.map {
            if *m == i {
                *m = j;
            }
        }
        j
    }

    /// The graph, and for each source node the fused node holding its value
    /// (`usize::MAX` if none).
    fn finish(self, output: usize) -> (Graph, Vec<usize>) {
        let mut index = vec![usize::MAX; self.nodes.len()];
        let mut nodes = Vec::new();
        for (i, mut node) in self.nodes.into_iter().enumerate() {
            if self.dead[i] {
                continue;
            }
            for v in &mut node.inputs {
                v.0 = index[v.0];
            }
            index[i] = nodes.len();
            nodes.push(node);
        }
        let (graph, pruned) = Graph {
            output: ValueId(index[output]),
            nodes,
        }
        .pruned_with_map();
        let source = self
            .map
            .iter()
            .map(|&b| match index.get(b) {
                Some(&i) if i != usize::MAX => pruned[i],
                _ => usize::MAX,
            })
            .collect();
        (graph, source)
    }
}

/// `conv` with the BatchNorm `(gamma, beta, mean, var, eps)` folded in.
fn fold_batch_norm(conv: &Op, bn: &Op) -> Result<Op> {
    let (
        Op::Conv2d {
            weight,
            bias,
            params,
            act: None,
        },
        Op::BatchNorm2d {
            weight: gamma,
            bias: beta,
            mean,
            var,
            eps,
            ..
        },
    ) = (conv, bn)
    else {
        unreachable!("fold_batch_norm is called on a convolution and a BatchNorm");
    };
    let w = weight.try_to_vec()?;
    let k = weight.dims()[0];
    let per = w.len() / k;
    let (gamma, beta, mean, var) = (
        gamma.try_to_vec()?,
        beta.try_to_vec()?,
        mean.try_to_vec()?,
        var.try_to_vec()?,
    );
    let b = match bias {
        Some(b) => b.try_to_vec()?,
        None => vec![0.0; k],
    };
    let mut folded_w = Vec::with_capacity(w.len());
    let mut folded_b = Vec::with_capacity(k);
    for o in 0..k {
        let s = gamma[o] as f64 / (var[o] as f64 + *eps as f64).sqrt();
        folded_w.extend(
            w[o * per..(o + 1) * per]
                .iter()
                .map(|&x| (x as f64 * s) as f32),
        );
        folded_b.push(((b[o] as f64 - mean[o] as f64) * s + beta[o] as f64) as f32);
    }
    Ok(Op::Conv2d {
        weight: Tensor::from_vec(folded_w, weight.dims())?,
        bias: Some(Tensor::from_vec(folded_b, [k])?),
        params: *params,
        act: None,
    })
}

/// Folds every BatchNorm that follows a convolution read by nothing else, and fuses each
/// activation and residual addition into the convolution or linear layer whose output it
/// alone reads. Other nodes are kept as they are.
pub fn fuse(graph: &Graph) -> Result<Graph> {
    fuse_where(graph, |_| true)
}

/// [`fuse`], fusing only the activations `fusable` accepts (quantization fuses those its
/// int8 kernels can apply, so the others stay float layers of their own).
pub fn fuse_where(graph: &Graph, fusable: impl Fn(crate::Activation) -> bool) -> Result<Graph> {
    Ok(fuse_mapped(graph, fusable)?.0)
}

/// [`fuse_where`], also returning for each node of `graph` the index of the fused node that
/// holds its value (a convolution, its BatchNorm and its activation all map to the fused
/// convolution; `usize::MAX` for a node whose value no longer exists).
pub fn fuse_mapped(
    graph: &Graph,
    fusable: impl Fn(crate::Activation) -> bool,
) -> Result<(Graph, Vec<usize>)> {
    let mut b = Builder {
        nodes: Vec::with_capacity(graph.nodes().len()),
        dead: Vec::new(),
        readers: graph.readers(),
        map: vec![usize::MAX; graph.nodes().len()],
    };
    for (i, node) in graph.nodes().iter().enumerate() {
        let sole = |v: ValueId| b.readers[v.0] == 1;
        let producer = node.inputs.first().map(|v| b.map[v.0]);
        let fused_into = match (&node.op, producer) {
            // The identity at inference.
            (Op::Dropout(_), Some(p)) => Some(p),
            (Op::BatchNorm2d { .. }, Some(p))
                if sole(node.inputs[0])
                    && matches!(b.nodes[p].op, Op::Conv2d { act: None, .. })
                    && b.nodes[p].inputs.len() == 1 =>
            {
                b.nodes[p].op = fold_batch_norm(&b.nodes[p].op, &node.op)?;
                Some(p)
            }
            (Op::Activation(a), Some(p)) if sole(node.inputs[0]) && fusable(*a) => {
                match &mut b.nodes[p].op {
                    Op::Conv2d { act, .. } | Op::Linear { act, .. } if act.is_none() => {
                        *act = Some(*a);
                        Some(p)
                    }
                    _ => None,
                }
            }
            (Op::Add, _) => {
                // The first input that is a convolution read only by this addition.
                let pick = (0..2).find(|&k| {
                    let p = b.map[node.inputs[k].0];
                    sole(node.inputs[k])
                        && matches!(b.nodes[p].op, Op::Conv2d { act: None, .. })
                        && b.nodes[p].inputs.len() == 1
                });
                match pick {
                    Some(k) => {
                        let residual = b.map[node.inputs[1 - k].0];
                        let mut p = b.map[node.inputs[k].0];
                        if residual > p {
                            p = b.move_to_end(p);
                        }
                        b.nodes[p].inputs.push(ValueId(residual));
                        b.nodes[p].shape = node.shape.clone();
                        Some(p)
                    }
                    None => None,
                }
            }
            _ => None,
        };
        b.map[i] = match fused_into {
            Some(p) => p,
            None => {
                let mut copy = node.clone();
                for v in &mut copy.inputs {
                    v.0 = b.map[v.0];
                }
                b.add(copy)
            }
        };
    }
    let output = b.map[graph.output().0];
    Ok(b.finish(output))
}
