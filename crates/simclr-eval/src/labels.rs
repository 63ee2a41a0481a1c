use std::borrow::Cow;

use candle_core::{DType, Tensor};

use crate::error::{EvalError, Result};

/// Anything that can provide class labels, one per sample: a candle tensor of an integer dtype
/// with shape `[N]` (on any device), or a slice / vector / array of `usize` or `u32`.
///
/// Range checks against the number of classes happen where the labels are used; this trait only
/// rejects labels that cannot be class indices at all (negative values, float dtypes, wrong rank).
pub trait LabelSource {
    /// The labels as class indices.
    fn to_labels(&self) -> Result<Cow<'_, [usize]>>;
}

impl LabelSource for [usize] {
    fn to_labels(&self) -> Result<Cow<'_, [usize]>> {
        Ok(Cow::Borrowed(self))
    }
}

impl LabelSource for Vec<usize> {
    fn to_labels(&self) -> Result<Cow<'_, [usize]>> {
        Ok(Cow::Borrowed(self.as_slice()))
    }
}

impl<const N: usize> LabelSource for [usize; N] {
    fn to_labels(&self) -> Result<Cow<'_, [usize]>> {
        Ok(Cow::Borrowed(self.as_slice()))
    }
}

impl LabelSource for [u32] {
    fn to_labels(&self) -> Result<Cow<'_, [usize]>> {
        Ok(Cow::Owned(self.iter().map(|&l| l as usize).collect()))
    }
}

impl<const N: usize> LabelSource for [u32; N] {
    fn to_labels(&self) -> Result<Cow<'_, [usize]>> {
        self.as_slice().to_labels()
    }
}

impl LabelSource for Vec<u32> {
    fn to_labels(&self) -> Result<Cow<'_, [usize]>> {
        self.as_slice().to_labels()
    }
}

impl LabelSource for Tensor {
    fn to_labels(&self) -> Result<Cow<'_, [usize]>> {
        if self.rank() != 1 {
            return Err(EvalError::LabelsShape(self.dims().to_vec()));
        }
        let labels: Vec<usize> = match self.dtype() {
            DType::U8 => self.to_vec1::<u8>()?.into_iter().map(usize::from).collect(),
            DType::U32 => self
                .to_vec1::<u32>()?
                .into_iter()
                .map(|l| l as usize)
                .collect(),
            DType::I16 => signed(self.to_vec1::<i16>()?.into_iter().map(i64::from))?,
            DType::I32 => signed(self.to_vec1::<i32>()?.into_iter().map(i64::from))?,
            DType::I64 => signed(self.to_vec1::<i64>()?.into_iter())?,
            other => return Err(EvalError::LabelsDtype(other)),
        };
        Ok(Cow::Owned(labels))
    }
}

fn signed(values: impl Iterator<Item = i64>) -> Result<Vec<usize>> {
    values
        .enumerate()
        .map(|(index, label)| {
            usize::try_from(label).map_err(|_| EvalError::NegativeLabel { index, label })
        })
        .collect()
}

/// Checks that every label is a valid class index.
pub(crate) fn check_range(labels: &[usize], num_classes: usize) -> Result<()> {
    match labels.iter().position(|&l| l >= num_classes) {
        Some(index) => Err(EvalError::LabelOutOfRange {
            index,
            label: labels[index],
            num_classes,
        }),
        None => Ok(()),
    }
}
