//! The chunk table of the CUDA multi-tensor kernels (the gradient norm's sum of squares and
//! AdamW over many parameters in one launch), shared by their CPU twins and the launches.

/// Elements per partial sum of [`crate::sum_of_squares`] and per thread block of the CUDA multi-tensor
/// kernels (`MT_CHUNK` in `kernels/ops.cu`).
pub(crate) const SQ_CHUNK: usize = 4096;

/// The chunk table of the CUDA multi-tensor kernels, for tensors of lengths `lens`: one word per
/// chunk of [`SQ_CHUNK`] elements, `tensor << 40 | first element`, tensors in order (empty ones
/// have none). A kernel's thread block `i` decodes word `i` and covers `[first, min(first +
/// 4096, len))` of its tensor.
// Used by the CUDA kernels only; built and tested on the CPU too.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn chunk_words(lens: impl Iterator<Item = usize>) -> candle_core::Result<Vec<u64>> {
    let mut words = vec![];
    for (i, n) in lens.enumerate() {
        if n >= 1 << 40 || i >= 1 << 23 {
            candle_core::bail!("multi-tensor kernel: tensor {i} with {n} elements is too large");
        }
        words.extend(
            (0..n)
                .step_by(SQ_CHUNK)
                .map(|s| ((i as u64) << 40) | s as u64),
        );
    }
    if words.len() > i32::MAX as usize {
        candle_core::bail!("multi-tensor kernel: {} chunks", words.len());
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decoded as the CUDA kernels decode them, the chunk words cover every element of every
    /// tensor exactly once, empty tensors and ragged tails included; oversized tables are refused.
    #[test]
    fn chunk_words_cover_every_element_once() -> candle_core::Result<()> {
        let lens = [
            0,
            1,
            SQ_CHUNK - 1,
            SQ_CHUNK,
            SQ_CHUNK + 1,
            3 * SQ_CHUNK + 17,
            0,
            5,
        ];
        let words = chunk_words(lens.iter().copied())?;
        let mut seen: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0u8; n]).collect();
        for w in &words {
            let (t, start) = ((w >> 40) as usize, (w & ((1 << 40) - 1)) as usize);
            let end = (start + SQ_CHUNK).min(lens[t]);
            assert!(start < end, "empty chunk {t}:{start}");
            for s in &mut seen[t][start..end] {
                *s += 1;
            }
        }
        assert!(seen.iter().flatten().all(|&c| c == 1));
        let expected: usize = lens.iter().map(|n| n.div_ceil(SQ_CHUNK)).sum();
        assert_eq!(words.len(), expected);
        assert!(chunk_words([1usize << 40].into_iter()).is_err());
        Ok(())
    }
}
