/*
 * FLEAD: the gRPC servers of PyFlink's Python workers, bound to the loopback address.
 *
 * Flink 2.2's flink-python jar carries its own copy of Beam's ServerFactory whose InetSocketAddressServerFactory
 * advertises a loopback URL but builds its server with NettyServerBuilder.forPort(port): the control, data, state,
 * logging, artifact and provisioning servers of every Python worker (six per Python operator) listen on all
 * interfaces, and no Flink option changes that (https://github.com/apache/beam/issues/21598).
 *
 * orchestration/setup.sh compiles this file against flink-python and ships ONLY the nested class
 * ServerFactory$InetSocketAddressServerFactory (build/flink-patches/flead-beam-patches.jar); flink_jobs/binding.py
 * puts that jar in front of flink-python on the classpath. The outer class here is a stub that lets javac compile
 * the nested one: at run time the real ServerFactory (its nest host) comes from flink-python. The nested class keeps
 * the original's constructors and methods, so the real outer class links against it unchanged.
 */
package org.apache.beam.sdk.fn.server;

import java.io.IOException;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.SocketAddress;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.function.Supplier;

import org.apache.beam.model.pipeline.v1.Endpoints;
import org.apache.beam.sdk.fn.channel.SocketAddressFactory;
import org.apache.beam.vendor.grpc.v1p60p1.io.grpc.BindableService;
import org.apache.beam.vendor.grpc.v1p60p1.io.grpc.Server;
import org.apache.beam.vendor.grpc.v1p60p1.io.grpc.ServerInterceptors;
import org.apache.beam.vendor.grpc.v1p60p1.io.grpc.netty.NettyServerBuilder;

public abstract class ServerFactory {

    public abstract Server allocateAddressAndCreate(
            List<BindableService> services, Endpoints.ApiServiceDescriptor.Builder descriptor) throws IOException;

    public abstract Server create(List<BindableService> services, Endpoints.ApiServiceDescriptor descriptor)
            throws IOException;

    /** Stub of the real interface (same name and method), for compiling only. */
    public interface UrlFactory {
        String createUrl(String host, int port);
    }

    /** Servers on a TCP port of the loopback address (the original bound every interface). */
    public static class InetSocketAddressServerFactory extends ServerFactory {
        // the Python side pings every 20 s; the server must allow pings that often
        private static final int KEEP_ALIVE_S = 19;

        private final UrlFactory urls;
        private final Supplier<Integer> ports;

        private InetSocketAddressServerFactory(UrlFactory urls) {
            this(urls, () -> 0);
        }

        private InetSocketAddressServerFactory(UrlFactory urls, Supplier<Integer> ports) {
            this.urls = urls;
            this.ports = ports;
        }

        @Override
        public Server allocateAddressAndCreate(
                List<BindableService> services, Endpoints.ApiServiceDescriptor.Builder descriptor)
                throws IOException {
            InetSocketAddress address = new InetSocketAddress(InetAddress.getLoopbackAddress(), ports.get());
            Server server = serve(services, address);
            descriptor.setUrl(urls.createUrl(address.getAddress().getHostAddress(), server.getPort()));
            return server;
        }

        @Override
        public Server create(List<BindableService> services, Endpoints.ApiServiceDescriptor descriptor)
                throws IOException {
            SocketAddress address = SocketAddressFactory.createFrom(descriptor.getUrl());
            if (!(address instanceof InetSocketAddress)) {
                throw new IllegalArgumentException(
                        "a TCP server needs a host:port address, got " + descriptor.getUrl());
            }
            return serve(services, (InetSocketAddress) address);
        }

        private static Server serve(List<BindableService> services, InetSocketAddress address) throws IOException {
            NettyServerBuilder builder = NettyServerBuilder.forAddress(address)
                    .maxInboundMessageSize(Integer.MAX_VALUE)  // message sizes are bounded by the layers above
                    .permitKeepAliveTime(KEEP_ALIVE_S, TimeUnit.SECONDS);
            for (BindableService service : services) {
                builder.addService(
                        ServerInterceptors.intercept(service, GrpcContextHeaderAccessorProvider.interceptor()));
            }
            return builder.build().start();
        }
    }
}
