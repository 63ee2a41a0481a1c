//! Examples of the simclr-rs crates used as libraries; the code is in the examples themselves:
//!
//! * `embed_imported`: import a SimCLRv2 network from a converter `.pth` file and embed a
//!   dataset's images with it (`cargo run --release -p simclr-examples --example embed_imported`);
//! * `finetune_imagefolder`: fine-tune a checkpoint on your own `root/train/<class>/*` images and
//!   evaluate it on `root/val/<class>/*`.
//!
//! This library is empty: Cargo needs one target besides the examples.
