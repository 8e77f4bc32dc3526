//! End-to-end suite support (see tests/).
