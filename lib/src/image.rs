//! Opening images by file name.
