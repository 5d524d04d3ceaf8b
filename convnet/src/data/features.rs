//! Examples that are already numbers: token ids of texts, audio samples, spectrograms.
//!
//! A [`FeatureDataset`] holds every example as `f32` values of one shape (`[L]` token ids,
//! `[1, L]` waveforms, `[1, mels, frames]` spectrograms) with class labels, in memory. The
//! [`super::DataLoader`] batches it like an image set, without decoding, normalisation or
//! augmentation: what the reader produced is what the model sees.
//!
//! ```
//! use convnet::data::FeatureDataset;
//! let ds = FeatureDataset::new(vec![1., 2., 3., 4., 5., 6.], vec![2], vec![0, 1, 0], vec!["a".into(), "b".into()], "memory")?;
//! assert_eq!((ds.len(), ds.example(1)), (3, &[3., 4.][..]));
//! assert_eq!(ds.with_classes(&["b".into()])?.example(0), &[3., 4.]);
//! assert!(FeatureDataset::new(vec![0.; 5], vec![2], vec![0, 1, 0], vec!["a".into(), "b".into()], "m").is_err());
//! # Ok::<(), convnet::Error>(())
//! ```

use crate::error::{invalid, Result};
use std::sync::Arc;

/// Labelled examples of one shape, as `f32` values (see the module documentation).
#[derive(Clone, Debug)]
pub struct FeatureDataset {
    values: Arc<Vec<f32>>,
    /// Positions in `values` (in examples) of this set's examples (`None`: all, in order).
    index: Option<Arc<Vec<usize>>>,
    dims: Vec<usize>,
    labels: Vec<u32>,
    classes: Vec<String>,
    /// Where the data came from (for messages).
    pub source: String,
}

impl FeatureDataset {
    /// Wraps `values` (`labels.len()` examples of shape `dims`, one after the other); checks
    /// the sizes and that every label names a class.
    pub fn new(
        values: Vec<f32>,
        dims: Vec<usize>,
        labels: Vec<u32>,
        classes: Vec<String>,
        source: impl Into<String>,
    ) -> Result<FeatureDataset> {
        let source = source.into();
        let per: usize = dims.iter().product();
        if dims.is_empty() || per == 0 {
            return Err(invalid(
                "FeatureDataset",
                format!("{source}: examples of shape {dims:?} hold no values"),
            ));
        }
        if Some(values.len()) != per.checked_mul(labels.len()) {
            return Err(invalid(
                "FeatureDataset",
                format!(
                    "{source}: {} values are not {} examples of shape {dims:?}",
                    values.len(),
                    labels.len()
                ),
            ));
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes.len()) {
            return Err(invalid(
                "FeatureDataset",
                format!("{source}: label {bad} but {} classes", classes.len()),
            ));
        }
        Ok(FeatureDataset {
            values: Arc::new(values),
            index: None,
            dims,
            labels,
            classes,
            source,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The shape of one example.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Class names, index = label.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// All labels.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Label of example `i`.
    pub fn label(&self, i: usize) -> usize {
        self.labels[i] as usize
    }

    /// The values of example `i`.
    pub fn example(&self, i: usize) -> &[f32] {
        let per: usize = self.dims.iter().product();
        let at = match &self.index {
            Some(ix) => ix[i],
            None => i,
        };
        &self.values[at * per..(at + 1) * per]
    }

    /// The examples at `indices`, in that order (sharing this set's values).
    pub fn select(&self, indices: &[usize]) -> FeatureDataset {
        let order = indices
            .iter()
            .map(|&i| match &self.index {
                Some(ix) => ix[i],
                None => i,
            })
            .collect();
        FeatureDataset {
            values: self.values.clone(),
            index: Some(Arc::new(order)),
            dims: self.dims.clone(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes.clone(),
            source: self.source.clone(),
        }
    }

    /// The examples of the classes `names` only, relabelled `0..names.len()` in that order;
    /// an unknown name is an error listing the classes there are.
    pub fn with_classes(&self, names: &[String]) -> Result<FeatureDataset> {
        let relabel = super::class_map(&self.source, &self.classes, names)?;
        let keep: Vec<usize> = (0..self.len())
            .filter(|&i| relabel[self.labels[i] as usize].is_some())
            .collect();
        let mut subset = self.select(&keep);
        subset.labels = keep
            .iter()
            .filter_map(|&i| relabel[self.labels[i] as usize])
            .collect();
        subset.classes = names.to_vec();
        Ok(subset)
    }

    /// `n` examples spread evenly over the set (all if fewer).
    pub fn spread(&self, n: usize) -> FeatureDataset {
        let n = n.min(self.len());
        let idx: Vec<usize> = (0..n).map(|i| i * self.len() / n).collect();
        self.select(&idx)
    }
}
