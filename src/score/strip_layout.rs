//! The strip layout: texts ordered by their video's column (unmatched texts last) and cut into
//! strips that end on caption-group boundaries, so all captions of a video sit in one strip. The
//! CPU passes cut their strips, the GPU path its row blocks and the split score its blocks from it.

use std::ops::Range;

/// Texts in strip order and the strips cut from them (the GPU path cuts its row blocks the
/// same way).
pub(crate) struct StripLayout {
    /// Position → text index: texts grouped by video column, unmatched texts last.
    pub(crate) order: Vec<usize>,
    /// Position → the column of the text's video.
    pub(crate) group: Vec<Option<u32>>,
    pub(crate) strips: Vec<Range<usize>>,
}

impl StripLayout {
    pub(crate) fn new(text_video: &[Option<u32>], columns: usize, strip_bytes: usize) -> StripLayout {
        StripLayout::with_strip_rows(text_video, (strip_bytes / (4 * columns.max(1))).clamp(8, 1024))
    }

    /// Strips of about `target` rows, each extended to the end of the caption group it cuts.
    pub(crate) fn with_strip_rows(text_video: &[Option<u32>], target: usize) -> StripLayout {
        let mut order: Vec<usize> = (0..text_video.len()).collect();
        order.sort_by_key(|&i| (text_video[i].map_or(u64::MAX, u64::from), i));
        let group: Vec<Option<u32>> = order.iter().map(|&i| text_video[i]).collect();
        let mut strips = Vec::new();
        let mut start = 0;
        while start < order.len() {
            let mut end = (start + target.max(1)).min(order.len());
            while end < order.len() && group[end].is_some() && group[end] == group[end - 1] {
                end += 1;
            }
            strips.push(start..end);
            start = end;
        }
        StripLayout { order, group, strips }
    }

    pub(crate) fn starts_group(&self, pos: usize) -> bool {
        pos == 0 || self.group[pos - 1] != self.group[pos]
    }

    pub(crate) fn ends_group(&self, pos: usize) -> bool {
        pos + 1 == self.group.len() || self.group[pos + 1] != self.group[pos]
    }
}
