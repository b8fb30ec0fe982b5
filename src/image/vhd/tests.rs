//! Tests of the VHD reader, writer and creator.
