//! What keygate tells its operator: the access log, the Prometheus metrics and the
//! diagnostic log. Reached from every part of the request path; it reaches into none of them.

pub mod access;
pub mod logging;
pub mod metrics;
pub mod model_labels;
