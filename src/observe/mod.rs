//! What keygate tells its operator: the access log, the Prometheus metrics and the
//! diagnostic log. Reached from every part of the request path; it reaches into none of them.

pub(crate) mod access;
pub(crate) mod labels;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod model_labels;
