//! End-to-end tests of the real `hale` binary: sessions over real loopback sockets, real
//! signals, real files.

mod abuse;
mod auth;
mod backup;
mod bad_input;
mod cgroups;
mod cluster;
mod containment;
mod corruption;
mod crash;
mod dashboard;
mod demo;
mod deploy;
mod encryption;
mod fsync;
mod fuzz;
mod health;
mod hooks;
mod jepsen;
mod listener;
mod messaging;
mod metrics;
mod nodes;
mod openapi;
mod python;
mod resilience;
mod schemathesis;
mod session;
mod supervise;
mod support;
mod systemd;
mod tasks;
mod tls;
