"""eval_video_segmentation: DAVIS-style mask propagation with patch features."""
