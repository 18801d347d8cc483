"""Where ``clipfusion watch`` takes its images from: a hot folder (:mod:`.folder`) or a video file,
stream or camera (:mod:`.video`), behind one small interface (:mod:`.base`)."""
