//! What the HTTP edges share (the service API, MQTT and AMQP over WebSocket, the
//! console): the listener's accept loop with its connection slots and the client
//! certificates each request carries ([`serve`]), a WebSocket read and written as a
//! byte stream ([`websocket`]), and Azure's error response ([`error`]). Neutral
//! ground: it knows no edge, so every edge may use it.

pub mod error;
pub mod serve;
pub mod websocket;
