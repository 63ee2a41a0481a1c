//! The decoded image every reader hands out, and the float image the augmentations work on.

/// `v / 255` for every byte `v`, the same bits as the division: the loaders convert every
/// pixel, and a table lookup is several times cheaper than a float division.
pub(crate) static UNIT: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut v = 0;
    while v < 256 {
        t[v] = v as f32 / 255.0;
        v += 1;
    }
    t
};

/// A decoded image: `height × width × channels` bytes in HWC order, 1 (gray) or 3 (RGB) channels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Image {
    pub fn new(height: usize, width: usize, channels: usize, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), height * width * channels, "image buffer size");
        assert!(channels == 1 || channels == 3, "1 or 3 channels");
        Image {
            height,
            width,
            channels,
            data,
        }
    }

    /// Float RGB in [0, 1]; a gray image is replicated to three identical channels, as
    /// `rgb_to_grayscale` followed by a tile does in the official pipeline.
    pub fn to_rgb_f32(&self) -> FImage {
        let n = self.height * self.width;
        let mut data = Vec::with_capacity(n * 3);
        match self.channels {
            1 => {
                for &v in &self.data {
                    let f = UNIT[v as usize];
                    data.extend_from_slice(&[f, f, f]);
                }
            }
            _ => data.extend(self.data.iter().map(|&v| UNIT[v as usize])),
        }
        FImage {
            height: self.height,
            width: self.width,
            data,
        }
    }
}

/// A float RGB image in HWC order, values nominally in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct FImage {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl FImage {
    pub fn zeros(height: usize, width: usize) -> Self {
        FImage {
            height,
            width,
            data: vec![0.0; height * width * 3],
        }
    }

    /// Writes the image into `out` as CHW, the layout of the network input.
    pub fn write_chw(&self, out: &mut [f32]) {
        let n = self.height * self.width;
        assert_eq!(out.len(), n * 3, "CHW buffer size");
        for (p, px) in self.data.chunks_exact(3).enumerate() {
            out[p] = px[0];
            out[n + p] = px[1];
            out[2 * n + p] = px[2];
        }
    }

    pub fn clip(&mut self) {
        for v in &mut self.data {
            *v = v.clamp(0.0, 1.0);
        }
    }
}
