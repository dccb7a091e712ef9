//! The node side of the cluster service: requests -> the local [`Node`].

use super::ClusterService;
use super::wire::{CallRequest, CallResponse, NodeRequest, NodeResponse};
use crate::Node;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Serves one node's actors to gateways and peers.
pub struct NodeService {
    node: Arc<Node>,
    incarnation: u64,
}

impl NodeService {
    /// Wraps the local node.
    pub fn new(node: Arc<Node>) -> Self {
        // Start time in microseconds: distinct for every start of the process.
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(1));
        Self { node, incarnation }
    }
}

#[tonic::async_trait]
impl ClusterService for NodeService {
    async fn call(&self, req: Request<CallRequest>) -> Result<Response<CallResponse>, Status> {
        // The trace context: the `traceparent` metadata header, else the body's copy.
        let header = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut req = req.into_inner();
        if header.is_some() {
            req.traceparent = header;
        }
        let span = if crate::trace::enabled() {
            // Exported: a child of the caller's span, in the caller's trace.
            let span = tracing::info_span!(
                "node.call",
                kind = request_kind(&req.body),
                ring_version = req.ring_version,
            );
            crate::trace::set_parent(&span, req.traceparent.as_deref());
            span
        } else {
            tracing::debug_span!(
                "node.call",
                traceparent = req.traceparent.as_deref().unwrap_or(""),
                ring_version = req.ring_version,
            )
        };
        let node = &self.node;
        if !matches!(req.body, NodeRequest::Ping) {
            // The caller runs another ring: catch up first if ours is the stale one, so that a
            // key that just moved here is served instead of bounced back with `not_owner`.
            node.sync_ring(req.ring_version).await;
        }
        let result = async move {
            match req.body {
                NodeRequest::Ping => Ok(NodeResponse::Pong {
                    node: node.ctx().config.node_id.clone(),
                    ring_version: node.ring().version(),
                    incarnation: self.incarnation,
                    draining: node.is_draining(),
                }),
                NodeRequest::Connect { profile, session } => node
                    .connect(profile, session)
                    .await
                    .map(|connected| NodeResponse::Connected {
                        connected: Box::new(connected),
                    }),
                NodeRequest::Disconnect {
                    user,
                    gateway,
                    session,
                } => {
                    node.disconnect(&user, &gateway, session).await;
                    Ok(NodeResponse::Done)
                }
                NodeRequest::Execute {
                    caller,
                    command,
                    auto_ref,
                } => node
                    .execute_with_ref(&caller, command, auto_ref)
                    .await
                    .map(|reply| NodeResponse::Reply {
                        reply: Box::new(reply),
                    }),
                NodeRequest::Subscribe { gateway, rooms } => node
                    .subscribe_owned(&gateway, &rooms)
                    .map(|()| NodeResponse::Done),
                NodeRequest::Unsubscribe { gateway, rooms } => {
                    node.unsubscribe_local(&gateway, &rooms);
                    Ok(NodeResponse::Done)
                }
                NodeRequest::UserGateways { user } => node
                    .local_user_gateways(&user)
                    .map(|gateways| NodeResponse::Gateways { gateways }),
                NodeRequest::Online { users } => Ok(NodeResponse::Online {
                    online: node.local_online(&users),
                }),
                NodeRequest::ReloadRoom { room } => {
                    node.reload_local_room(room);
                    Ok(NodeResponse::Done)
                }
                NodeRequest::ImportUsers { users } => node
                    .import_users(users)
                    .await
                    .map(|count| NodeResponse::Imported { count }),
            }
        }
        .instrument(span)
        .await;
        Ok(Response::new(CallResponse { result }))
    }
}

/// The request's name, for its span.
fn request_kind(body: &NodeRequest) -> &'static str {
    match body {
        NodeRequest::Ping => "ping",
        NodeRequest::Connect { .. } => "connect",
        NodeRequest::Disconnect { .. } => "disconnect",
        NodeRequest::Execute { command, .. } => command.name(),
        NodeRequest::Subscribe { .. } => "subscribe",
        NodeRequest::Unsubscribe { .. } => "unsubscribe",
        NodeRequest::UserGateways { .. } => "user_gateways",
        NodeRequest::Online { .. } => "online",
        NodeRequest::ReloadRoom { .. } => "reload_room",
        NodeRequest::ImportUsers { .. } => "import_users",
    }
}
