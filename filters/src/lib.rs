//! Sans-IO decision logic for Ringway.
