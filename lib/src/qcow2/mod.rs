//! The qcow2 engine.
